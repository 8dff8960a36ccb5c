"""Plots and Ray metrics of a job."""

import json
import time
import urllib.request

import pytest
import ray

from moe_cluster.observe import PlotWriter, RayMetrics, expert_load_heatmap, load_imbalance, loss_curve
from moe_cluster.train.launch import free_port

PNG = b"\x89PNG\r\n\x1a\n"


def test_heatmap_and_loss_curve(tmp_path):
    out = expert_load_heatmap([[10, 0, 30, 60], [25, 25, 25, 25]], tmp_path / "h.png", step=7)
    assert out.read_bytes()[:8] == PNG
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 5.0 / s, **({"val_loss": 4.0 / s} if s % 2 == 0 else {})}) + "\n" for s in range(1, 9)))
    assert loss_curve(metrics, tmp_path / "l.png").read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="expected per-layer expert counts"):
        expert_load_heatmap([], tmp_path / "x.png", 1)

    writer = PlotWriter(tmp_path)
    writer.on_metrics({"step": 4, "loss": 1.0, "val_loss": 1.0, "expert_counts": [[1, 2], [3, 4]]})
    writer.on_event({"event": "finished"})
    assert (tmp_path / "expert_load_step00000004.png").is_file() and (tmp_path / "loss_curve.png").is_file()


def test_load_imbalance():
    assert load_imbalance([[25, 25, 25, 25]]) == pytest.approx(1.0)
    assert load_imbalance([[25, 25, 25, 25], [100, 0, 0, 0]]) == pytest.approx(4.0)


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith(("ray_moe_", "moe_")):
            name = line.split("{")[0].split(" ")[0].removeprefix("ray_")
            samples[name] = float(line.rsplit(" ", 1)[1])
    return samples


@pytest.mark.ray
@pytest.mark.slow
def test_ray_metrics_reach_the_prometheus_endpoint_during_a_run(tmp_path):
    from moe_cluster.cluster.launch import run_job
    from tests.cluster.helpers import Background, small_job

    port = free_port()
    # Ray exports every 10 s by default; every second here, so that a short job is seen running.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 1000})  # fmt: skip
    try:
        job = small_job(tmp_path, max_steps=150, checkpoint_every=50)
        job.logger.plots = False
        run = Background(lambda: run_job(job))
        samples, deadline = {}, time.monotonic() + 120
        while time.monotonic() < deadline and not run._thread.join(0) and run._thread.is_alive():
            samples = _scrape(port)
            if samples.get("moe_step", 0) > 0 and "moe_expert_load_imbalance" in samples:
                print(f"metrics seen at step {samples['moe_step']:g}")
                break
            time.sleep(0.5)
        summary = run.result(timeout=300)
        assert summary["steps"] == 150
        assert 0 < samples["moe_step"] < 150  # seen while the job ran
        assert 0 < samples["moe_loss"] < 10
        assert samples["moe_tokens_per_second"] > 0
        assert samples["moe_expert_load_imbalance"] >= 1.0
        assert samples["moe_world_size"] == 2

        # Failure and recovery series (the run above had none): published as the controller would.
        metrics = RayMetrics(job_name="recovered-job")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            metrics.on_event({"event": "failure", "kind": "actor_died", "step": 3})
            metrics.on_event({"event": "recovered", "recovery_s": 3.5, "replayed_steps": 2, "source": "peers"})
            samples = _scrape(port)
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            if "moe_last_recovery_seconds" in samples and 'source="peers"' in text:
                break
            time.sleep(0.5)
        assert samples["moe_last_recovery_seconds"] == pytest.approx(3.5)
        assert any(k.startswith("moe_restarts") for k in samples) and any(k.startswith("moe_failures") for k in samples)
        assert any(line.startswith("ray_moe_restarts") and 'source="peers"' in line for line in text.splitlines())
    finally:
        ray.shutdown()


def test_grafana_dashboard_shows_every_metric():
    import pathlib
    import re

    path = pathlib.Path(__file__).resolve().parents[2] / "k8s" / "grafana-dashboard.json"
    dash = json.loads(path.read_text())
    shown = {re.match(r"ray_(moe_\w+)", t["expr"]).group(1) for p in dash["panels"] for t in p["targets"]}
    source = (pathlib.Path(__file__).resolve().parents[2] / "moe_cluster" / "observe" / "ray_metrics.py").read_text()
    defined = set(re.findall(r'"(moe_\w+)"', source))
    assert shown == defined
