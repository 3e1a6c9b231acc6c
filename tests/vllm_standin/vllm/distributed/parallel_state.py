"""Stand-in for ``vllm.distributed.parallel_state``: the clean-up calls, counted in ``calls``."""

calls: list[str] = []


def destroy_model_parallel() -> None:
    calls.append("destroy_model_parallel")


def destroy_distributed_environment() -> None:
    calls.append("destroy_distributed_environment")


def cleanup_dist_env_and_memory(shutdown_ray: bool = False) -> None:
    """The real one destroys the parallel groups and the process group, then collects garbage and
    empties the accelerator cache."""
    calls.append("cleanup_dist_env_and_memory")
