"""--executor ray sizing, decided before Ray schedules anything (Ray would wait forever for
resources no node has): which pools fit a cluster, and what each actor asks for."""
import pytest

from gen.config import RunConfig
from gen.generate.ray_executor import ExecutorUnavailable, check_fit, gpus_per_actor, model_path

CPU_ONLY = [("10.0.0.1", {"CPU": 16.0})]
TWO_GPU_NODES = [("10.0.0.1", {"CPU": 32.0, "GPU": 4.0}), ("10.0.0.2", {"CPU": 32.0, "GPU": 2.0})]


def test_gpus_on_a_cluster_without_any_name_the_setting_and_the_nodes():
    with pytest.raises(ExecutorUnavailable) as e:
        check_fit(CPU_ONLY, actors=1, gpus=1, cpus=1)
    assert "--ray-gpus-per-actor 1: the Ray cluster has no GPU (10.0.0.1: 0 GPU, 16 CPU)" in str(e.value)
    assert "--ray-gpus-per-actor 0" in str(e.value)


def test_a_tensor_parallel_group_must_fit_on_one_node():
    # 6 GPUs in all, but no node has 8
    with pytest.raises(ExecutorUnavailable, match="no node of the Ray cluster has 8 GPUs.*tensor_parallel_size"):
        check_fit(TWO_GPU_NODES, actors=1, gpus=8, cpus=1)


def test_more_actors_than_the_cluster_holds_names_ray_actors():
    check_fit(TWO_GPU_NODES, actors=3, gpus=2, cpus=1)       # 2 on the first node, 1 on the second
    with pytest.raises(ExecutorUnavailable, match="--ray-actors 4 .* holds only 3 .*10.0.0.2: 2 GPU"):
        check_fit(TWO_GPU_NODES, actors=4, gpus=2, cpus=1)
    with pytest.raises(ExecutorUnavailable, match="--ray-actors 3 .* holds only 2"):
        check_fit([("n", {"CPU": 2.0})], actors=3, gpus=0, cpus=1)


def test_fractional_gpus_share_a_gpu():
    check_fit([("n", {"CPU": 8.0, "GPU": 1.0})], actors=2, gpus=0.5, cpus=1)


def test_gpus_per_actor_default_follows_the_parallel_sizes_and_the_cluster():
    vllm = RunConfig(captions="x", engine="vllm", vllm_args={"tensor_parallel_size": 2,
                                                             "pipeline_parallel_size": 2})
    assert gpus_per_actor(vllm, cluster_gpus=8) == 4
    assert gpus_per_actor(vllm, cluster_gpus=0) == 0        # the CPU build
    assert gpus_per_actor(RunConfig(captions="x", engine="vllm"), cluster_gpus=8) == 1
    assert gpus_per_actor(RunConfig(captions="x", engine="openai", base_urls=["http://h/v1"]), 8) == 0
    explicit = RunConfig(captions="x", engine="vllm", ray_gpus_per_actor=1)
    assert gpus_per_actor(explicit, cluster_gpus=0) == 1    # then refused by check_fit, by name


def test_model_path_tells_a_directory_from_a_hub_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    assert model_path("m") == str(tmp_path / "m")           # absolute: workers have their own cwd
    assert model_path("/models/Qwen2.5-7B") == "/models/Qwen2.5-7B"
    assert model_path("Qwen/Qwen2.5-7B-Instruct") is None
