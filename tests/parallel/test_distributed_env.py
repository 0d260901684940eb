"""Which GPU a process drives, from each launcher's environment: the variables torchrun, the
deepspeed launcher, srun and mpirun set, and a one-line error where nothing says."""

import pytest

from revcol_dist.parallel.distributed import LaunchError, dist_env, local_rank_from_env


def test_torchrun_second_node():
    # torchrun --nnodes 2 --nproc_per_node 8: the first rank of node 2
    env = {"RANK": "8", "WORLD_SIZE": "16", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1"}
    assert local_rank_from_env(env, gpus_per_node=8) == 0


def test_deepspeed_launcher_second_node():
    # deepspeed --hostfile: RANK is global, LOCAL_RANK the node's (never cuda:RANK on node 2)
    env = {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "CROSS_RANK": "1"}
    assert local_rank_from_env(env, gpus_per_node=8) == 3


def test_slurm_srun_one_task_per_gpu():
    env = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_NTASKS_PER_NODE": "8(x2)"}
    info = dist_env(env)
    assert (info.rank, info.world_size, info.local_rank) == (13, 16, 5)
    assert env["RANK"] == "13" and env["LOCAL_RANK"] == "5"  # written back for DeepSpeed and torch


def test_slurm_without_localid_uses_tasks_per_node():
    env = {"RANK": "13", "WORLD_SIZE": "16", "SLURM_NTASKS_PER_NODE": "8(x2)"}
    assert local_rank_from_env(env, gpus_per_node=8) == 5


def test_open_mpi():
    env = {"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}
    info = dist_env(env)
    assert (info.rank, info.world_size, info.local_rank) == (6, 8, 2)


def test_local_world_size_fallback():
    assert local_rank_from_env({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "4"}, gpus_per_node=4) == 1


def test_one_process_and_cpu_need_nothing():
    assert local_rank_from_env({}, gpus_per_node=8) == 0
    assert local_rank_from_env({"RANK": "3", "WORLD_SIZE": "4"}, gpus_per_node=0) == 0  # gloo on CPUs


def test_nothing_to_go_by_is_an_error_naming_the_fix():
    with pytest.raises(LaunchError, match="export LOCAL_RANK"):
        local_rank_from_env({"RANK": "9", "WORLD_SIZE": "16"}, gpus_per_node=8)


def test_empty_variable_is_not_taken():
    env = {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "", "SLURM_LOCALID": "1"}
    assert local_rank_from_env(env, gpus_per_node=8) == 1
