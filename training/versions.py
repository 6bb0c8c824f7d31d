"""The installed versions of the packages a result depends on, recorded beside it (merge manifest, bench results)."""

from importlib import metadata


def installed(packages: tuple[str, ...]) -> dict[str, str | None]:
    """{package: version}, None for a package that is not installed."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out
