"""The committed gRPC code must be exactly what proto/ generates."""

from pathlib import Path

from serving import protogen


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    for fresh in protogen.generate(tmp_path):
        committed = protogen.OUT_DIR / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed} is stale: run `make proto` (python -m serving.protogen) and commit"
        )
