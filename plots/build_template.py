"""Rebuild plots/offline.html: DVC's plots page with vega, vega-lite and vega-embed inlined.

`dvc plots show` / `dvc plots diff` write an HTML page whose Vega plots load three scripts from a CDN;
offline they draw nothing. .dvc/config points plots.html_template at plots/offline.html, which carries
the same libraries (the versions DVC's own page asks for) inside the page, so a plot renders with no
network and the page still works when copied elsewhere (`-o`, e-mail, CI artefacts).

    python plots/build_template.py    # needs npm and the npm registry; the result is committed
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The versions dvc-render's vega renderer loads from its CDN (dvc_render/vega.py), so DVC's templates
# render exactly as they would online. All three are BSD-3-Clause (texts in plots/licenses/).
PACKAGES = {"vega": ("5.20.2", "build/vega.min.js"), "vega-lite": ("5.2.0", "build/vega-lite.min.js"),
            "vega-embed": ("6.18.2", "build/vega-embed.min.js")}
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")


def fetch(work: Path) -> dict[str, tuple[str, str]]:
    """(version, script text) per package, from `npm pack` tarballs; licences copied beside the page."""
    out = {}
    for name, (version, script) in PACKAGES.items():
        tgz = subprocess.run(["npm", "pack", f"{name}@{version}", "--silent"], cwd=work, check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        with tarfile.open(work / tgz) as tar:
            text = tar.extractfile(f"package/{script}").read().decode("utf-8")
            (HERE / "licenses" / f"{name}-{version}.LICENSE").write_bytes(tar.extractfile("package/LICENSE").read())
        # An inline script must not close its own tag, and DVC fills the page by plain text replacement.
        if "</script" in text.lower() or any(p in text for p in PLACEHOLDERS):
            raise SystemExit(f"{name}@{version}: {script} cannot be inlined as is")
        out[name] = (version, text)
    return out


def page(scripts: dict[str, tuple[str, str]]) -> str:
    header = "\n".join(f"  {name} {version}, BSD-3-Clause, sha256 {hashlib.sha256(text.encode()).hexdigest()}"
                       for name, (version, text) in scripts.items())
    inline = "\n".join(f"<script>/* {name}@{version} */\n{text}\n</script>" for name, (version, text) in scripts.items())
    return f"""<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{{refresh_tag}}
<title>DVC plots</title>
<!-- Written by plots/build_template.py: the Vega libraries are inlined so the page renders offline.
{header}
-->
{inline}
<style>
  table {{ border-spacing: 15px; }}
</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def main() -> None:
    if not shutil.which("npm"):
        sys.exit("build_template: npm not found; install Node.js and npm")
    with tempfile.TemporaryDirectory() as tmp:
        text = page(fetch(Path(tmp)))
    (HERE / "offline.html").write_text(text, encoding="utf-8")
    print(f"wrote {HERE / 'offline.html'} ({len(text) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
