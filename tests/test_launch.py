"""The launcher mapping: torchrun's and srun's variables to rank, world, local rank and
rendezvous, read in one place (`regate_megatron.training.parallel.launch_env`)."""

import pytest

from regate_megatron.training.parallel import first_slurm_host, launch_env

SRUN = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "4242"}


@pytest.mark.parametrize("nodelist, first", [
    ("gpu[003-010,12],cpu1", "gpu003"), ("n1,n2", "n1"), ("n[1-2]", "n1"), ("node7", "node7"),
    ("rack2-[10,11]", "rack2-10"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_srun_task():
    env = launch_env(SRUN)
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("slurm", 3, 4, 1)
    assert env.master_addr == "gpu007"
    assert env.master_port == 20000 + 4242 % 20000
    # An exported MASTER_ADDR/PORT (the sbatch script's) wins over the derived ones.
    env = launch_env(dict(SRUN, MASTER_ADDR="10.0.0.7", MASTER_PORT="31000"))
    assert (env.master_addr, env.master_port) == ("10.0.0.7", 31000)


def test_torchrun_wins_and_batch_shell_is_single():
    env = launch_env(dict(SRUN, RANK="5", WORLD_SIZE="8", LOCAL_RANK="5", MASTER_ADDR="h",
                          MASTER_PORT="1234"))
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("torchrun", 5, 8, 5)
    # The batch shell has SLURM_PROCID too, but no step: it is not a rank.
    batch_shell = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    assert launch_env(batch_shell).launcher == "single"
    assert launch_env({}).world_size == 1


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="SLURM_LOCALID"):
        launch_env({k: v for k, v in SRUN.items() if k != "SLURM_LOCALID"})
    with pytest.raises(ValueError, match="RANK='x'"):
        launch_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_a_failing_rank_names_itself(monkeypatch, capsys):
    """An uncaught error in a tool becomes exit status 1 and a line naming the rank, so a
    multi-node job's log says which rank died (srun --label adds the rank to every line too)."""
    from regate_megatron.training.parallel import run_tool

    for name, value in SRUN.items():
        monkeypatch.setenv(name, value)

    def body():
        raise RuntimeError("out of memory")

    assert run_tool("regate-train", body) == 1
    err = capsys.readouterr().err
    assert "regate-train: rank 3 of 4 (local rank 1 on " in err and "out of memory" in err


def test_run_tool_leaves_a_world_it_did_not_bring_up(megatron_world):
    """A tool called inside an existing world (a test session, a script embedding it) tears
    down only what it brought up itself."""
    from megatron.core import parallel_state

    from regate_megatron.training.parallel import run_tool

    def body():
        raise ValueError("bad input")

    assert run_tool("regate-train", body) == 2
    assert parallel_state.model_parallel_is_initialized()
