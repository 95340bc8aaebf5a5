"""``gradindex demo`` and ``gradindex info``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from gradindex.cli.app import main
from gradindex.cli.options import (
    STORE_LOCATION,
    device_option,
    echo_table,
    parse_task_options,
    progress_enabled,
    setting_text,
    task_option,
)


@main.command()
@click.option("--task", "task_spec", default="digits", show_default=True,
              help="Built-in task to demo (digits, diffusion, ...).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("gradindex-demo"),
              show_default=True, help="Output folder (checkpoint, store, PNG report).")
@click.option("-k", type=click.IntRange(min=1), default=5, show_default=True, help="Training examples per query.")
@click.option("--queries", "num_queries", type=click.IntRange(min=1), default=6, show_default=True,
              help="Number of held-out queries.")
@task_option
@device_option
@click.pass_context
def demo(ctx, task_spec: str, out: Path, k: int, num_queries: int, task_options, device: str) -> None:
    """Run the whole pipeline end to end on bundled data and print the top-k
    (per concept too, for a task with concepts: `--task diffusion`)."""
    from gradindex.cli.demo import run_demo

    result = run_demo(task_spec, out, k=k, num_queries=num_queries, device=device, show_progress=progress_enabled(ctx),
                      task_options=parse_task_options(task_options))
    for query in result.queries:
        caption = f" ({query['caption']})" if query["caption"] else ""
        click.echo(f"\nquery {query['query']}{caption}: top-{k} training examples")
        captions = any(r["caption"] for r in query["results"])
        echo_table([{"rank": r["rank"], "sample_id": r["sample_id"], "score": r["score"],
                      **({"example": r["caption"]} if captions else {})} for r in query["results"]])
    if result.concept_precision:
        click.echo(f"\nper concept: fraction of each query's top-{k} sharing its value")
        echo_table([{"concept": c, f"precision@{k}": p} for c, p in result.concept_precision.items()])
    click.echo("")
    click.echo("timings: " + ", ".join(f"{name} {secs:.2f}s" for name, secs in result.seconds.items()))
    click.echo(f"store:   {result.store}")
    if result.png:
        click.echo(f"report:  {result.png}")
    if result.concept_png:
        click.echo(f"concept report: {result.concept_png}")
    if result.html:
        click.echo(f"html report: {result.html} (open it in a browser; `gradindex serve {result.store}` explores more)")


@main.command()
@click.argument("store_path", metavar="STORE", type=STORE_LOCATION)
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def info(store_path, as_json) -> None:
    """Show a store's manifest: task, groups, dims, shards, weights, indexes."""
    from gradindex.store.feature_store import FeatureStore
    from gradindex.eval.summary import store_summary

    store = FeatureStore.open(store_path, verify=False)
    if as_json:
        click.echo(json.dumps(store.manifest, indent=2))
        return
    summary = store_summary(store)
    projection = summary["projection"]
    click.echo(f"store:       {summary['store']}")
    click.echo(f"task:        {summary['task']} {summary['task_options'] or ''}".rstrip())
    click.echo(f"checkpoint:  {summary['checkpoint']} (fingerprint {summary['model_fingerprint'][:16]}…)")
    click.echo(f"examples:    {summary['num_samples']} in {summary['shards']} shard(s), {summary['dtype']}")
    click.echo(f"projection:  {projection['kind']}, proj_dim {projection['proj_dim']}, "
               f"seed {projection['seed']}; dimension {summary['dim']}")
    rows = []
    for group in summary["groups"]:
        row = {"group": group["group"], "params": group["params"], "dim": group["dim"]}
        for concept in summary["concepts"]:
            row[f"w[{concept}]"] = group["weights"][concept]
            if concept in group.get("shares", {}):
                row[f"share[{concept}]"] = group["shares"][concept]
        for concept, damping in group.get("damping", {}).items():
            row[f"damping[{concept}]"] = damping
        rows.append(row)
    echo_table(rows)
    options = store.manifest["task"].get("options", {})
    if store.manifest["task"]["task"].endswith(":CheckpointEnsemble"):
        click.echo(f"checkpoints: {len(options['checkpoints'])} of {options['task']}, query-side weights "
                   f"{options['weights']} (TracIn over checkpoints; docs/estimators.md)")
    factors = store.manifest.get("factors")
    if factors:
        click.echo(f"factors:     K-FAC/EK-FAC, {factors['fisher']} Fisher, {factors['count']} examples; Kronecker "
                   f"blocks {len(factors.get('kronecker_blocks', []))}, diagonal E[g²] for "
                   f"{', '.join(factors.get('diagonal_blocks', [])) or 'none'} ({factors['file']})")
    for concept, settings in summary["learned_weights"].items():
        for key, learned in settings.items():
            objective = learned.get("objective")
            snr = (f", {learned['num_queries']} queries x {learned['reference_size']} examples, objective {objective['name']} "
                   f"{objective['uniform']:.3f} (uniform) -> {objective['learned']:.3f}"
                   if objective and {"num_queries", "reference_size"} <= set(learned) else "")
            setting = setting_text(learned) if "preconditioner" in learned else key
            click.echo(f"weights {concept!r}: {learned['method']} for {setting}{snr}; digest {learned['digest']}")
    tuned = store.manifest.get("tuned")
    if isinstance(tuned, dict) and "preconditioner" in tuned:
        damping = "" if tuned.get("damping") is None else f", damping {tuned['damping']:g}"
        ceiling = f", ceiling {tuned['ceiling']:.3f}" if tuned.get("ceiling") is not None else ""
        click.echo(f"default setting (gradindex tune): {tuned['preconditioner']}{damping}, {tuned['method']} weights; "
                   f"LDS {tuned['lds']:.4f} ± {tuned['se']:.4f} on {tuned['queries']} {tuned.get('split', 'fit')} "
                   f"queries, {tuned['models']} subsets x {tuned['runs_per_subset']} runs{ceiling}")
    else:
        click.echo("default setting: label-free (gram, damping 0.1, learned weights where present); "
                   "`gradindex tune` chooses one by LDS when the task can retrain")
    for concept, index in summary["indexes"].items():
        line = (f"index {concept!r}: {index['kind']}, {setting_text(index)}, {index['ntotal']} vectors in "
                f"{index['parts']} part(s); built with weights {index['weights']}")
        if index["stale"]:
            line += f"; the store's current weights are {index['current_weights']}: run build-index again to use them"
        click.echo(line)
        entry = store.manifest["indexes"][concept]
        if entry.get("calibration"):
            from gradindex.index.calibrate import describe

            click.echo(f"  search knobs {describe(entry['calibration'], entry['kind'])}")
        elif entry.get("kind") in ("ivf", "ivfpq", "hnsw"):
            from gradindex.index.calibrate import knob_text

            click.echo(f"  search knobs {knob_text(entry.get('search', {}), entry['kind'])} (0 = default; not calibrated)")
