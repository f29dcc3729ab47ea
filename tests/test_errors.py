"""The exit-status rule every gfm_fast command line tool shares (gfm_fast.errors.exit_status): what
the user can fix is one ``error:`` line and status 2; anything else is a traceback, as for a bug."""
import pytest

from gfm_fast.errors import ConfigError, GFMError, exit_status


def _raise(exc):
    def work():
        raise exc
    return work


def test_the_work_s_own_status_passes_through():
    assert exit_status(lambda: None) == 0
    assert exit_status(lambda: 143) == 143


def test_a_user_error_is_one_line_and_status_2(capsys):
    assert exit_status(_raise(ConfigError("data.batch_size=0 must be >= 1;\n  set data.batch_size=16"))) == 2
    assert capsys.readouterr().err == "error: data.batch_size=0 must be >= 1; set data.batch_size=16\n"


def test_an_os_error_names_the_path(capsys):
    assert exit_status(_raise(PermissionError(13, "Permission denied", "/out/run"))) == 2
    assert capsys.readouterr().err == "error: cannot use '/out/run': Permission denied\n"
    assert exit_status(_raise(NotADirectoryError(20, "Not a directory", "/a/file/out"))) == 2
    assert "a file is in the way of a folder" in capsys.readouterr().err


def test_errors_outside_the_chosen_kinds_keep_their_traceback(capsys):
    with pytest.raises(KeyError):
        exit_status(_raise(KeyError("bug")))
    with pytest.raises(OSError):  # training: an OSError mid-run is reported whole
        exit_status(_raise(OSError(28, "No space left on device", "/ckpt")), (GFMError,))
    assert exit_status(_raise(ValueError("bad stages")), (GFMError, ValueError)) == 2
    assert capsys.readouterr().err == "error: bad stages\n"
