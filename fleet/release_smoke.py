"""Running a release's smoke vectors on this machine's runtime, as a device's install does
(``fleetlite release verify --smoke``): each variant's model after a crash-isolated check, a
language model with its tokenizer and generation metadata.
"""

from __future__ import annotations

from pathlib import Path

from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.smoke import SmokeVectors, check_vectors_match_model, run_smoke

__all__ = ["run_bundle_smoke"]


def run_bundle_smoke(bundle: ReleaseBundle) -> list[str]:
    """Run every variant's smoke vectors on this machine's runtime; problems, empty if none.

    Verify the bundle first: this loads its models (after a crash-isolated check).
    """
    import tempfile

    from fleetlite.sdk.runtime.interpreter import load_model
    from fleetlite.sdk.runtime.isolated import check_model

    if bundle.manifest.generation is not None:
        return _run_lm_bundle_smoke(bundle)
    problems: list[str] = []
    for variant in bundle.manifest.all_variants():
        vectors = SmokeVectors.from_json(bundle.files[variant.smoke.file])
        found = check_vectors_match_model(vectors, variant.model)
        if not found:
            with tempfile.TemporaryDirectory() as tmp:
                model_path = Path(tmp) / variant.model.file
                model_path.write_bytes(bundle.files[variant.model.file])
                check_model(model_path)
            model = load_model(bundle.files[variant.model.file])
            found = run_smoke(vectors, model.run, variant.smoke.tolerance)
        problems.extend(f"variant {variant.name}: {p}" for p in found)
    return problems


def _run_lm_bundle_smoke(bundle: ReleaseBundle) -> list[str]:
    """A language model's smoke test here, as a device runs it: model, tokenizer and metadata
    agree, then each variant's greedy tokens and first-step logits are judged."""
    import tempfile

    from fleetlite.sdk.errors import FleetLiteError
    from fleetlite.sdk.lm_smoke import LmSmokeVectors, judge
    from fleetlite.sdk.runtime.isolated import check_language_model
    from fleetlite.sdk.runtime.lm_engine import LmEngine
    from fleetlite.sdk.runtime.lm_smoke_runner import run_vectors
    from fleetlite.sdk.runtime.tokenizer import load_tokenizer

    spec = bundle.manifest.generation
    assert spec is not None
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in bundle.files.items():
            (Path(tmp) / name).write_bytes(content)
        for variant in bundle.manifest.all_variants():
            model = Path(tmp) / variant.model.file
            try:
                check_language_model(model)
                engine = LmEngine(model, spec=spec,
                                  tokenizer=load_tokenizer(Path(tmp) / spec.tokenizer,
                                                           spec.tokenizer_kind))
                vectors = LmSmokeVectors.from_json(bundle.files[variant.smoke.file])
                found = judge(vectors, run_vectors(engine, vectors), variant.smoke.tolerance)
            except FleetLiteError as exc:
                reason = getattr(exc, "reason", "")
                found = [f"{exc}" + (f" [{reason}]" if reason else "")]
            problems.extend(f"variant {variant.name}: {p}" for p in found)
    return problems
