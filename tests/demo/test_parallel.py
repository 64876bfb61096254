"""run_many: a failing run raises with its name and stderr tail; each run logs beside its output."""

import pytest

from alignti.demo.parallel import run_many
from alignti.errors import AlignTIError
from tests.distill.worlds import distill_config


def test_failure_names_the_run_with_its_stderr_tail(tmp_path):
    bad = distill_config(student=str(tmp_path / "missing"), out=str(tmp_path / "a"), data="x.json", recipe="sft",
                         max_steps=1, progress=False)
    other = distill_config(student=str(tmp_path / "missing2"), out=str(tmp_path / "b"), data="x.json", recipe="sft",
                           max_steps=1, progress=False)
    # Both runs fail at start-up; whichever is polled first after its exit is the one reported, so
    # the check is that the message names a run and quotes that run's own stderr, not the other's.
    with pytest.raises(AlignTIError, match=r"distillation (one|two) failed \(exit 2\).*config.json") as err:
        run_many([bad, other], ["one", "two"], jobs=2)
    msg = str(err.value)
    own = "missing'" if msg.startswith("distillation one") else "missing2'"
    assert own in msg
    assert (tmp_path / "a.log").is_file() and (tmp_path / "b.log").is_file()
