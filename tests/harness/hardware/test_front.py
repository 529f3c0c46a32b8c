"""The roofline's Pareto front: its floors against the roofline's own byte and FLOP
counts, the crossing batch, and where measured points sit."""
import pytest

from wallperf.harness.config import load_hardware_config, load_model_config
from wallperf.harness.hardware.front import StepCost, decode_mfu, front_rows, place_on_front, step_cost
from wallperf.harness.hardware.counts import WeightBytes, flops_per_token
from wallperf.harness.hardware.roofline import bytes_per_step, peak_flops


@pytest.fixture(scope="module")
def setup():
    shape = load_model_config("smollm2-135m").shape
    hardware = load_hardware_config("cpu")
    return shape, hardware, step_cost(shape, hardware, "bfloat16")


@pytest.mark.parametrize("batch, context", [(1, 0), (1, 300), (7, 513), (64, 2048)])
def test_floors_are_the_rooflines_counts(setup, batch, context):
    shape, hardware, cost = setup
    bw = hardware.bandwidth_gbps * 1e9
    assert cost.memory_floor_s(batch, context) == pytest.approx(
        bytes_per_step(shape, "bfloat16", batch, context) / bw)
    assert cost.compute_floor_s(batch, context) == pytest.approx(
        batch * flops_per_token(shape, context) / peak_flops(hardware, "bfloat16"))


def test_an_engines_own_byte_counts_pass_through(setup):
    shape, hardware, _ = setup
    own = {"weights": WeightBytes(table=28.3e6, dense=68.3e6), "kv_bytes_per_element": 2}
    cost = step_cost(shape, hardware, "bfloat16", **own)
    assert cost.weight_bytes == pytest.approx(96.6e6)
    assert cost.memory_floor_s(4, 100) == pytest.approx(
        bytes_per_step(shape, "bfloat16", 4, 100, **own) / (hardware.bandwidth_gbps * 1e9))


def test_crossing_batch_is_where_the_floors_meet(setup):
    _, _, cost = setup
    b = cost.crossing_batch(400)
    assert b is not None and 1 < b < 1000
    assert cost.memory_floor_s(b, 400) == pytest.approx(cost.compute_floor_s(b, 400))
    rows = front_rows(cost, 400, [1, int(b) + 1])
    assert [r["bound"] for r in rows] == ["memory", "compute"]
    # KV reads that grow faster than the FLOPs: never compute-bound.
    kv_heavy = StepCost(1e6, 1e9, 1e6, 1.0, 1e9, 1e15)
    assert kv_heavy.crossing_batch(100) is None


def test_front_rows_trade_per_user_for_system_throughput(setup):
    _, _, cost = setup
    rows = front_rows(cost, 300, [1, 2, 4, 8, 16, 32, 64])
    users = [r["per_user_tokens_per_second"] for r in rows]
    system = [r["system_tokens_per_second"] for r in rows]
    assert users == sorted(users, reverse=True) and system == sorted(system)
    assert system[0] == pytest.approx(users[0])


@pytest.mark.parametrize("batch", [1, 3, 17.5, 40, 200])
def test_a_point_on_the_front_has_share_one(setup, batch):
    _, _, cost = setup
    step = cost.step_s(batch, 250)
    placed = place_on_front(cost, 250, batch / step, 1 / step)
    assert placed["front_batch"] == pytest.approx(batch)
    assert placed["front_share"] == pytest.approx(1.0)
    # Half the system throughput at the same per-user speed: half the concurrency the front allows.
    assert place_on_front(cost, 250, batch / step / 2, 1 / step)["front_share"] == pytest.approx(0.5)


def test_decode_mfu_by_hand():
    cost = StepCost(weight_bytes=1e6, kv_bytes_per_position=10.0, flops_per_token=2e6, flops_per_position=100.0,
                    bandwidth_bytes_per_s=1e9, peak_flops_per_s=1e12)
    # 8 rows x (2e6 + 100 x 1000) FLOPs in 1 ms, over 1 TFLOP/s.
    assert decode_mfu(cost, 8, 1000, 1e-3) == pytest.approx(8 * 2.1e6 / 1e-3 / 1e12)
    with pytest.raises(ValueError):
        StepCost(0, 1, 1, 1, 1, 1)
