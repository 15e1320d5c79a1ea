"""One real Label Studio per pytest session, and our backend next to it.

Both are package-scoped: this package holds every real-LS test, so that is one instance per
session, stopped as soon as these tests are done (not left running beside the rest of the suite).

Label Studio comes from ``.venv-ls`` (``make test-env`` / ``scripts/install_test_env.sh``). When it
is missing or does not start, the tests here are skipped with the reason — unless ``REQUIRE_LS=1``
(CI sets it), where that is a failure.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import LS_EXE, LS_VERSION, Backend, LabelStudio, readme_label_config, unavailable


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.real_ls)
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item (the browser tests save artifacts when a call failed)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def note(pytestconfig):
    """Write a line to the terminal even when output is captured (timings, where the logs are)."""
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def write(line: str) -> None:
        if reporter is None or capture is None:
            print(line)
            return
        with capture.global_and_fixture_disabled():
            if pytestconfig.option.verbose < 0:  # -q: after the progress dots, not beside them
                reporter.write("\n")
            reporter.write_line(f"  [real_ls] {line}")

    return write


@pytest.fixture(scope="package")
def label_studio(tmp_path_factory, note):
    if not LS_EXE.exists():
        unavailable(f"{LS_EXE} missing: run `make test-env` (scripts/install_test_env.sh)")
    tmp = tmp_path_factory.mktemp("label-studio")
    try:
        ls = LabelStudio.start(tmp)
    except Exception as exc:  # a missing/broken LS is an environment problem: say so
        unavailable(f"Label Studio did not start ({type(exc).__name__}: {str(exc)[-1500:]})")
    try:
        version = ls.version()
        assert version == LS_VERSION, f"tests are written against Label Studio {LS_VERSION}, found {version}"
        note(f"Label Studio {version} at {ls.url} (log {ls.proc.log})")
        yield ls
    finally:
        ls.stop()


@pytest.fixture(scope="package")
def backend(label_studio, tmp_path_factory):
    """Our backend (this tree) with the fixture models, LS's URL and personal access token."""
    be = Backend(tmp_path_factory.mktemp("backend"), label_studio).start()
    try:
        yield be
    finally:
        be.stop()


@pytest.fixture(scope="session")
def label_config() -> str:
    """The README's label config: what users paste is what is tested."""
    return readme_label_config()


@pytest.fixture(scope="module")
def editor(label_studio):
    """Headless Chromium logged in to Label Studio (``browser.Editor``), one per test module."""
    import importlib.util

    missing = [p for p in ("/usr/bin/chromium", "/usr/bin/chromedriver") if not Path(p).exists()]
    if missing or importlib.util.find_spec("selenium") is None:
        unavailable(f"{missing or 'selenium'} missing: run `make test-env` (scripts/install_test_env.sh)")
    from .browser import Editor, start_chromium

    driver = start_chromium()
    try:
        ed = Editor(driver, label_studio.url)
        ed.login(label_studio.user, label_studio.password)
        yield ed
    finally:
        driver.quit()
