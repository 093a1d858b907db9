from ipferry.runtime.paths import default_runtime_dir


def test_runtime_dir_fallbacks(monkeypatch):
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_runtime_dir().as_posix() == "/run/user/1000/ipferry"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_runtime_dir().as_posix() == "/run/ipferry"
