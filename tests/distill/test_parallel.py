"""run_many: a failing run raises with its name and stderr tail; each run logs beside its output."""

import pytest

from alignti.distill.config import DistillConfig
from alignti.distill.parallel import run_many
from alignti.errors import AlignTIError


def test_failure_names_the_run_with_its_stderr_tail(tmp_path):
    bad = DistillConfig(student=str(tmp_path / "missing"), out=str(tmp_path / "a"), data="x.json", recipe="sft",
                        max_steps=1, progress=False)
    slow = DistillConfig(student=str(tmp_path / "missing2"), out=str(tmp_path / "b"), data="x.json", recipe="sft",
                         max_steps=1, progress=False)
    with pytest.raises(AlignTIError, match=r"distillation one failed \(exit 1\).*config.json"):
        run_many([bad, slow], ["one", "two"], jobs=2)
    assert (tmp_path / "a.log").is_file() and (tmp_path / "b.log").is_file()
