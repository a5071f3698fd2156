#!/usr/bin/env bash
# Rebuilds offline.html beside this script: DVC's plots page with vega, vega-lite and vega-embed inlined, so that
# `dvc plots show` and `dvc plots diff` draw every plot without internet (DVC's own page loads the three from a
# CDN, and a machine offline shows them blank). .dvc/config names the page: plots.html_template = plots/offline.html
# (DVC reads it relative to .dvc/). Needs npm and the npm registry. A rebuild from the same versions gives the same
# bytes: `git diff --exit-code .dvc/plots` after running it checks the committed page.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

# DVC 3.67 (dvc-render 1.0.2) writes vega-lite v5 specs and pins vega 5.20.2, vega-lite 5.2.0, vega-embed 6.18.2
# on its CDN page; these are the newest releases of the same majors (vega 5 is the last with a browser bundle).
packages=(vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "${packages[@]}" >/dev/null)  # npm checks each tarball against the registry's sha512

provenance=""
scripts="$work/scripts.html"
for package in "${packages[@]}"; do
  name=${package%@*} version=${package#*@}
  bundle="package/build/$name.min.js"
  tar -xzf "$work/$name-$version.tgz" -C "$work" "$bundle"
  # An inlined script ends at the first "</script" and parses differently after "<!--", and DVC replaces its
  # placeholders wherever they appear: none of these may occur in a script.
  if grep -q -F -e '</script' -e '<!--' -e '{scripts}' -e '{plot_divs}' -e '{refresh_tag}' "$work/$bundle"; then
    echo "$name $version: $bundle holds </script, <!-- or a DVC placeholder and cannot be inlined as it is" >&2
    exit 1
  fi
  provenance+="  $name $version: npm pack $package, $bundle, sha256 $(sha256sum "$work/$bundle" | cut -d' ' -f1)"$'\n'
  { printf '<script>'; cat "$work/$bundle"; printf '</script>\n'; } >> "$scripts"
  rm "$work/$bundle"
done

# DVC's page (dvc_render/html.py PAGE_HTML) without its scripts placeholder, which DVC fills with the CDN's tags.
# DVC replaces its placeholders wherever they appear, comments included: the comment names none of them.
cat > "$here/offline.html" <<HTML
<!DOCTYPE html>
<!--
DVC's plots page with its JavaScript inlined, so that plots draw offline. Built by .dvc/plots/build_offline.sh
from the npm registry (each script below is the file named, byte for byte):
$provenance-->
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
$(cat "$scripts")
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
HTML
echo "wrote $here/offline.html ($(stat -c %s "$here/offline.html") bytes)"
