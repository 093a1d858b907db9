from ipferry.supervisor.children import Restarts


def test_backoff_doubles_up_to_max_then_crash_loop():
    r = Restarts(initial=0.5, maximum=3, limit=4, window=60)
    assert [r.record_death(now=t) for t in (0, 1, 2, 3)] == [0.5, 1.0, 2.0, 3]
    assert r.record_death(now=4) is None  # fifth death inside the window: give up


def test_deaths_outside_the_window_are_forgotten():
    r = Restarts(initial=1, maximum=30, limit=2, window=10)
    assert r.record_death(now=0) == 1
    assert r.record_death(now=5) == 2
    assert r.record_death(now=12) == 2  # the first fell out of the window
    assert r.record_death(now=30) == 1
