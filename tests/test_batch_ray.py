"""`flashllm batch --ray`: the resumable batch spread over engines on a two-node Ray cluster on this machine.

The cluster (ray.cluster_utils.Cluster: a head and a second node, each its own
raylet with one CPU) is started once for the module. Each node's processes run
in a home folder of their own, where `store` links to the store that node has;
a test that gives `--store /proc/self/cwd/store` thereby opens, on each node,
that node's store at the same path, as on machines with separate disks.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

pytest.importorskip("ray", reason="flashllm batch --ray needs the `ray` extra")

from daemon_process import TEST_ENV, descendants  # noqa: E402
from flashllm.runtime.clients.batch import read_done_keys  # noqa: E402
from flashllm.runtime.clients.cli import main as cli_main  # noqa: E402

pytestmark = pytest.mark.slow  # a two-node Ray cluster and the demo model: minutes, not seconds

PROMPTS = 40
NODE_OBJECT_STORE_BYTES = 100 * 2**20  # the smallest Ray takes comfortably; the prompts and lines are tiny


@contextlib.contextmanager
def working_directory(path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def environment(**variables):
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class TwoNodeCluster:
    def __init__(self, cluster, homes, temp_dir: str):
        self.cluster = cluster
        self.homes = homes
        self.temp_dir = temp_dir  # the nodes' sessions, logs and sockets; removed with the cluster

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self, name: str, store: str):
        """A node whose processes see `store` at /proc/self/cwd/store."""
        home = self.homes / name
        home.mkdir()
        (home / "store").symlink_to(store)
        # the raylet, and the replicas it starts, inherit the folder; and they keep Ray's out-of-memory monitor
        # off: it watches the whole machine, where other programs' memory would kill these replicas at random
        with working_directory(home), environment(RAY_memory_monitor_refresh_ms="0"):
            node = self.cluster.add_node(num_cpus=1, object_store_memory=NODE_OBJECT_STORE_BYTES,
                                         include_dashboard=False, resources={name: 1}, temp_dir=self.temp_dir)
        self.cluster.wait_for_nodes()
        return node


@pytest.fixture(scope="module")
def two_nodes(demo_store, tmp_path_factory):
    from ray.cluster_utils import Cluster

    from ray._private.utils import get_ray_address_file

    # a short path of its own: Ray's unix sockets live below it (at most ~107 bytes)
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # Cluster.add_node records the head's address in Ray's default temp folder whatever temp_dir says, and
    # fails where that folder does not exist yet (a fresh machine): made here, removed after if made here
    address_dir = os.path.dirname(get_ray_address_file(None))
    made_address_dir = not os.path.isdir(address_dir)
    os.makedirs(address_dir, exist_ok=True)
    cluster = Cluster(initialize_head=False)
    try:
        running = TwoNodeCluster(cluster, tmp_path_factory.mktemp("ray-node-homes"), temp_dir)
        running.add_node("node-a", demo_store)  # the first one is the head
        running.add_node("node-b", demo_store)
        yield running
    finally:
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if made_address_dir:
            shutil.rmtree(address_dir, ignore_errors=True)


def write_prompts(path, max_tokens: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(PROMPTS):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"Story number {i}:", "max_tokens": max_tokens}) + "\n")


def read_lines(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def assert_every_id_once(path) -> list[dict]:
    lines = read_lines(path)
    ids = [line["id"] for line in lines]
    assert len(ids) == PROMPTS and set(ids) == {f"p{i}" for i in range(PROMPTS)}
    assert all("text" in line and line["usage"]["completion_tokens"] >= 1 for line in lines)
    return lines


def ray_batch_command(prompts, out, store, address, *extra) -> list[str]:
    return ["flashllm", "batch", str(prompts), "--out", str(out), "--store", store, "--ray", address,
            "--replicas", "2", "--quiet", *extra]


def start_and_wait_for_lines(command, out, lines: int) -> subprocess.Popen:
    """Start the batch driver as its own process; return once OUT holds `lines` lines (it is still running)."""
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **TEST_ENV})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and driver.poll() is None:
        if out.exists() and out.read_text().count("\n") >= lines:
            return driver
        time.sleep(0.01)
    driver.kill()
    stdout, stderr = driver.communicate()
    pytest.fail(f"the batch ended (or stalled) before {lines} lines: rc {driver.returncode}\n{stderr}")


def replica_processes() -> list[int]:
    """The EngineReplica actors' processes on this machine's test cluster (below this process's raylets)."""
    found = []
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"ray::EngineReplica" in f.read():
                    found.append(pid)
        except OSError:
            continue
    return sorted(found)


def test_forty_prompts_on_two_nodes_match_the_single_machine_batch(two_nodes, demo_store, tmp_path, capsys):
    prompts, single, spread = tmp_path / "in.jsonl", tmp_path / "single.jsonl", tmp_path / "ray.jsonl"
    write_prompts(prompts, max_tokens=4)
    assert cli_main(["batch", str(prompts), "--out", str(single), "--store", demo_store, "--quiet"]) == 0
    capsys.readouterr()

    assert cli_main(["batch", str(prompts), "--out", str(spread), "--store", demo_store, "--ray", two_nodes.address,
                     "--replicas", "2", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    text_by_id = {line["id"]: line["text"] for line in assert_every_id_once(spread)}
    assert text_by_id == {line["id"]: line["text"] for line in assert_every_id_once(single)}  # temperature 0

    assert summary["replicas"] == 2 and summary["nodes"] == 2 and summary["prompts"] == PROMPTS
    assert summary["tokens"] == PROMPTS * 4 and summary["tokens_per_s"] > 0 and summary["requeued"] == 0
    replicas = summary["per_replica"]
    assert len({replica["node_id"] for replica in replicas}) == 2  # one replica on each node
    assert all(replica["prompts"] >= 1 and replica["threads"] == 1 for replica in replicas)
    assert sum(replica["tokens"] for replica in replicas) == summary["tokens"]
    assert "tok/s" in captured.err and "2 replicas on 2 nodes" in captured.err  # one bar, then per-replica rates
    for replica in replicas:
        assert f"replica {replica['index']} on node {replica['node_id'][:12]}" in captured.err


def test_a_replica_killed_midway_loses_and_duplicates_nothing(two_nodes, demo_store, tmp_path):
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(prompts, max_tokens=4)
    driver = start_and_wait_for_lines(
        ray_batch_command(prompts, out, demo_store, two_nodes.address, "--max-batch", "2", "--json"), out, 4)
    try:
        replicas = replica_processes()
        assert len(replicas) == 2, replicas
        os.kill(replicas[0], signal.SIGKILL)
        stdout, stderr = driver.communicate(timeout=300)
    finally:
        driver.kill()
        driver.wait()
    assert driver.returncode == 0, stderr
    assert_every_id_once(out)
    summary = json.loads(stdout)
    killed = [replica for replica in summary["per_replica"] if replica["restarts"]]
    assert len(killed) == 1 and killed[0]["requeued"] >= 1  # it was running prompts; they were done elsewhere
    assert summary["requeued"] == killed[0]["requeued"] and summary["prompts"] == PROMPTS


def test_a_killed_driver_reruns_to_exactly_forty_lines(two_nodes, demo_store, tmp_path, capsys):
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(prompts, max_tokens=4)
    driver = start_and_wait_for_lines(
        ray_batch_command(prompts, out, demo_store, two_nodes.address, "--max-batch", "2"), out, 4)
    driver.send_signal(signal.SIGKILL)
    driver.communicate()
    done_before = len(read_done_keys(str(out)))
    assert 4 <= done_before < PROMPTS

    assert cli_main(ray_batch_command(prompts, out, demo_store, two_nodes.address)[1:]) == 0
    assert_every_id_once(out)
    assert f"{PROMPTS - done_before} to do" in capsys.readouterr().err
    assert cli_main(ray_batch_command(prompts, out, demo_store, two_nodes.address)[1:]) == 0
    assert len(read_lines(out)) == PROMPTS  # a third run finds nothing to do


def test_a_replica_with_another_store_is_refused_naming_its_node(two_nodes, demo_store, tiny_stores, tmp_path,
                                                                 monkeypatch, capsys):
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(prompts, max_tokens=4)
    stranger = two_nodes.add_node("node-c", tiny_stores("llama"))
    try:
        monkeypatch.chdir(two_nodes.homes / "node-a")  # the driver has the demo store at the path too
        assert cli_main(["batch", str(prompts), "--out", str(out), "--store", "/proc/self/cwd/store",
                         "--ray", two_nodes.address, "--replicas", "3", "--quiet"]) == 2
    finally:
        two_nodes.cluster.remove_node(stranger)
    err = capsys.readouterr().err
    assert f"on node {stranger.node_id[:12]}" in err and "did not start" in err
    assert "manifest checksum" in err and "copy the driver's store to the same path on this node" in err
    assert err.count("did not start") == 1  # the two nodes with the driver's store are not blamed
    assert not out.exists() or read_lines(out) == []


def test_a_replica_asking_more_than_any_node_has_is_refused(two_nodes, demo_store, tmp_path, capsys):
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(prompts, max_tokens=4)
    assert cli_main(["batch", str(prompts), "--out", str(out), "--store", demo_store, "--ray", two_nodes.address,
                     "--memory", "4096GiB", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no node of the Ray cluster can hold a replica asking for 1 CPU, 4096.0 GiB memory" in err
    assert "lower --threads-per-replica, --gpus-per-replica or --memory" in err
    assert not out.exists()


def test_ray_is_imported_only_with_dash_dash_ray(tiny_stores, tmp_path):
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "The quick brown fox", "max_tokens": 2}) + "\n")
    script = ("import sys; from flashllm.runtime.clients.cli import main; "
              f"rc = main(['batch', {str(prompts)!r}, '--out', {str(out)!r}, '--store', {tiny_stores('llama')!r}, "
              "'--quiet']); print(rc, sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')), "
              "'flashllm.runtime.clients.ray_batch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **TEST_ENV})
    assert result.stdout.split() == ["0", "[]", "False"], result.stderr
    assert [line["id"] for line in read_lines(out)] == ["a"]


def test_ray_options_without_dash_dash_ray_are_refused(tiny_stores, tmp_path, capsys):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    assert cli_main(["batch", str(prompts), "--out", str(tmp_path / "o.jsonl"), "--store", tiny_stores("llama"),
                     "--replicas", "2"]) == 2
    assert "--replicas applies to --ray" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
