"""asarm: any-subset autoregressive models with exact any-order and speculative sampling."""

__version__ = "0.1.0"
