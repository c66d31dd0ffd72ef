"""Run a package's entry point the way its container would, for ``mlcube/check.py``:

    python mlcube/sandbox.py PROJECT/mlcube.py infer --data_path ... --output_path ...

* Only the package's own code: the repository's editable install is switched off (its import finder and path
  entries are removed) and ``PROJECT/`` is the first import path, so a module missing from the package fails to
  import here as it would in the image, instead of being found in the checkout.
* No network: connecting an internet socket to anything but the loopback interface, or resolving another host
  name, raises ``OSError``, as in a container run with ``--network none`` (how MedPerf runs models).

Standard library only: it runs before anything of the package is imported.
"""
import ipaddress
import runpy
import socket
import sys
from pathlib import Path

REFUSED = "network access refused: MedPerf runs model containers with --network none (mlcube/sandbox.py)"
INTERNET = (socket.AF_INET, socket.AF_INET6)


def is_loopback(host) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _guard(function, host_of):
    def guarded(*args, **kwargs):
        if not is_loopback(host_of(*args)):
            raise OSError(REFUSED)
        return function(*args, **kwargs)
    return guarded


def block_network() -> None:
    """Refuse connections and name lookups beyond the loopback interface; Unix sockets keep working."""
    def address_host(sock, address, *rest):
        return address[0] if sock.family in INTERNET else None

    socket.socket.connect = _guard(socket.socket.connect, address_host)
    socket.socket.connect_ex = _guard(socket.socket.connect_ex, address_host)
    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
        setattr(socket, name, _guard(getattr(socket, name), lambda host, *rest: host))


def forget_checkout() -> None:
    """Remove setuptools' editable-install hooks, so only ``sys.path`` (the package, site-packages) is searched."""
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
    sys.path[:] = [p for p in sys.path if "__editable__" not in p]


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python mlcube/sandbox.py SCRIPT [ARGS ...]")
    script = Path(sys.argv[1]).resolve()
    sys.argv = [str(script), *sys.argv[2:]]
    sys.path[0] = str(script.parent)  # in place of this file's folder, as `python SCRIPT` would have it
    forget_checkout()
    block_network()
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
