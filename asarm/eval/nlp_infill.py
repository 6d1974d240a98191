"""ROCStories story infilling (Story Cloze 2016 val): fill the blank sentences with every sampler
and score them with ROUGE-1/2/L F x100, with NFE and tokens per round.

Settings (spec section 6): "1/5" = prompt s1 s2, blank s3, suffix s4 s5; "3/5" = prompt s1, blank
s2-s4, suffix s5. The blank has as many tokens as the reference under the model's tokenizer (or
``--blank-length`` / ``--blank-ratio``). Every sampler decodes the same items with the same per-row
seeds; ``--trials`` repeat with fresh seeds and are pooled into one ROUGE mean. Paper settings:
``_run_nlp_infill_eval.sh`` (therealgabeguo/ASARM, revision nlp, k 10, 5 trials, all 1871 stories).
"""

from __future__ import annotations

import argparse

from .infill import (TextCodec, describe_blank, encode_rows,
                     infill, repeat_trials)
from .rocstories import ROUGE_TYPES, load_stories, make_items, rouge_scores
from ..sampling.spec import resolve_samplers
from .commands import check_rocstories
from .arguments import load_model, samplers_from_args
from .markdown import markdown_table
from .plots import bar_chart
from .record import EvalRun

__all__ = ["run"]

_ROUGE_NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}


def run(args: argparse.Namespace) -> dict:
    settings = check_rocstories(args)
    samplers = samplers_from_args(args)
    stories = load_stories(args.data, args.limit)
    if not stories:
        raise ValueError("no stories to evaluate")
    model = load_model(args)
    samplers = resolve_samplers(samplers, model, args.model)
    codec = TextCodec(model.tokenizer)
    out = EvalRun("rocstories", args)
    results: dict[str, dict[str, dict]] = {}
    for setting in settings:
        items = make_items(stories, setting)
        rows, _ = encode_rows(codec, [(it.prompt, it.reference, it.suffix) for it in items], args.blank_length,
                              args.blank_ratio)
        trials, trial_rows, seeds = repeat_trials(rows, args.trials, args.seed)
        references = [items[i].reference for _, i in trials]
        results[setting] = {}
        for spec in samplers:
            decoded = infill(model, spec, trial_rows, seeds, batch_size=args.batch_size, engine=args.engine,
                             progress=not args.no_progress)
            predictions = [codec.decode_blank(decoded.rows[j].prefix, decoded.blank(j)) for j in range(len(trials))]
            rouge = rouge_scores(predictions, references)
            results[setting][spec.name] = {**rouge.mean, **decoded.summary()}
            out.samples({"story_id": items[i].story_id, "setting": setting, "sampler": spec.name, "trial": t,
                         "prompt": items[i].prompt, "reference": items[i].reference, "prediction": predictions[j],
                         "suffix": items[i].suffix, "blank_tokens": rows[i].blank, "nfe": int(decoded.nfe[j]),
                         "rounds": int(decoded.rounds[j]), **rouge.per_item[j]}
                        for j, (t, i) in enumerate(trials))
            print(f"{setting} {spec.name}: " + " ".join(f"{_ROUGE_NAMES[r]} {rouge.mean[r]:.2f}" for r in ROUGE_TYPES)
                  + f", NFE {results[setting][spec.name]['nfe']:.1f} ({decoded.seconds:.1f} s)")
    metrics = {"stories": len(stories), "settings": settings, "samplers": [s.name for s in samplers], "k": args.k,
               "trials": args.trials, "blank": describe_blank(args), "results": results}
    bar_chart(out.path("rouge.png"), {_ROUGE_NAMES[r]: {s: {name: m[r] for name, m in by.items()}
                                                      for s, by in results.items()} for r in ROUGE_TYPES},
              "F x 100")
    table = [{"setting": setting, "sampler": name, **{_ROUGE_NAMES[r]: m[r] for r in ROUGE_TYPES},
              "NFE": m["nfe"], "tokens/round": m["tokens_per_round"], "blank tokens": m["blank_tokens"]}
             for setting, by in results.items() for name, m in by.items()]
    summary = (f"Model `{args.model}`{f' (revision {args.revision})' if args.revision else ''}; {len(stories)} "
               f"stories x {args.trials} trial(s) pooled; blank = {describe_blank(args)}; ASSD k = {args.k}, "
               f"T = {args.temperature:g}. ROUGE F-measure x 100; NFE per story.\n\n" + markdown_table(table)
               + "\n![ROUGE](rouge.png)\n")
    return out.finish(metrics, summary)
