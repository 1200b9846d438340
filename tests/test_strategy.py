"""The strategy on hand-made replies: weighted average, Adam per group, rejections."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity
from scipy import stats

from gating.federated.aggregation import AggregationRule
from gating.federated.evaluation import scalar_figures
from gating.federated.protocol import METRICS, NODE, NUM_EXAMPLES, UPDATE
from gating.federated.server_step import ServerStep
from gating.stats import mean_ci95
from server.strategy import MetaLearningStrategy
from server.validation import RoundFailed, node_problem

PARAMS = {
    "backbone.w": torch.tensor([[1.0, -2.0], [0.5, 3.0]]),
    "backbone.b": torch.tensor([0.1, -0.1]),
    "gate.w": torch.tensor([2.0, 4.0, -1.0]),
}
TRAIN = {1: 101, 2: 102, 3: 103}  # partition id -> node id
TARGET = {4: 104, 5: 105}


@pytest.fixture(autouse=True)
def task_identity():
    """Messages need a run identity, as inside a Flower run."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def make_strategy(
    learned=("backbone", "gate"), optimizer="adam", backbone_lr=0.01, gate_lr=0.1, **overrides
) -> MetaLearningStrategy:
    options = dict(clients_per_round=3, min_train_replies=2, seed=0, gated_layers=2)
    options.update(overrides)
    step = ServerStep(PARAMS, learned, optimizer, {"backbone": backbone_lr, "gate": gate_lr})
    return MetaLearningStrategy(step, TRAIN, TARGET, **options)


def sent(strategy: MetaLearningStrategy, server_round: int = 1) -> list[Message]:
    return list(
        strategy.configure_train(server_round, strategy.arrays(), ConfigRecord({}), grid=None)
    )


def reply(to: Message, grads: dict[str, np.ndarray], examples: float, partition: int) -> Message:
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: examples,
            "query-loss": 1.0,
            "query-accuracy": 0.5,
            "flops-ratio": 0.7,
            "deployed-flops-ratio": 0.6,
            "partition-id": partition,
        }
    )
    update = ArrayRecord({k: Array(np.asarray(v)) for k, v in grads.items()})
    return Message(RecordDict({UPDATE: update, METRICS: metrics}), reply_to=to)


def random_grads(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in PARAMS.items()}


def adam_by_hand(p, grads_per_step, lr, b1=0.9, b2=0.999, eps=1e-8):
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads_per_step, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return p


def test_update_is_weighted_average_then_one_adam_step_per_group_with_state_kept():
    strategy = make_strategy()
    weights = {1: 10.0, 2: 30.0, 3: 60.0}
    averages = []
    for server_round in (1, 2):
        messages = sent(strategy, server_round)
        assert sorted(strategy.train_nodes[p] for p in TRAIN) == sorted(
            m.metadata.dst_node_id for m in messages
        )
        grads = {p: random_grads(10 * server_round + p) for p in TRAIN}
        node_to_partition = {v: k for k, v in TRAIN.items()}
        replies = [
            reply(
                m,
                grads[node_to_partition[m.metadata.dst_node_id]],
                weights[node_to_partition[m.metadata.dst_node_id]],
                node_to_partition[m.metadata.dst_node_id],
            )
            for m in messages
        ]
        total = sum(weights.values())
        averages.append(
            {
                k: sum(weights[p] / total * grads[p][k].astype(np.float64) for p in TRAIN)
                for k in PARAMS
            }
        )
        arrays, metrics = strategy.aggregate_train(server_round, reversed(replies))
        assert metrics["replies"] == 3
        assert metrics["query-accuracy"] == pytest.approx(0.5)

    result = arrays.to_torch_state_dict()
    for name, start in PARAMS.items():
        lr = 0.1 if name.startswith("gate.") else 0.01
        expected = adam_by_hand(start.numpy().astype(np.float64), [a[name] for a in averages], lr)
        np.testing.assert_allclose(result[name].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_under_dp_only_what_went_through_a_mechanism_leaves_the_round():
    rule = AggregationRule(noise_multiplier=1.0, dp_clip_norm=1.0)
    step = ServerStep(PARAMS, ("backbone", "gate"), "sgd", {"backbone": 0.1, "gate": 0.1}, rule)
    strategy = MetaLearningStrategy(step, TRAIN, TARGET, clients_per_round=3, min_train_replies=3)
    replies = [reply(m, random_grads(i), 5, i) for i, m in enumerate(sent(strategy))]
    _, metrics = strategy.aggregate_train(1, replies)
    # the clients' own measurements: neither published nor acted on
    for key in ("query-loss", "query-accuracy", "flops-ratio", "clipped", "update-norm"):
        assert math.isnan(metrics[key]), key
    # the deployed ratio λ acts on: the Gaussian mechanism's output, not the replies' 0.6
    assert metrics["deployed-flops-ratio"] != pytest.approx(0.6)
    assert metrics["replies"] == 3


def test_bad_replies_are_left_out_and_the_rest_still_averaged(caplog):
    strategy = make_strategy(optimizer="sgd", backbone_lr=1.0, gate_lr=1.0, min_train_replies=1)
    first, second, third = sent(strategy)
    good = random_grads(1)
    nan = random_grads(2)
    nan["gate.w"][1] = np.nan
    wrong_shape = random_grads(3)
    wrong_shape["backbone.w"] = np.zeros((3, 2), np.float32)
    replies = [reply(first, good, 5, 1), reply(second, nan, 5, 2), reply(third, wrong_shape, 5, 3)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["replies"] == 1
    for name, start in PARAMS.items():  # plain SGD with lr 1: params - the one good gradient
        np.testing.assert_allclose(arrays[name].numpy(), start.numpy() - good[name], rtol=1e-6)
    assert "non-finite" in caplog.text and "shape (3, 2)" in caplog.text


@pytest.mark.parametrize(
    "breakage",
    [
        "error",
        "missing-tensor",
        "extra-tensor",
        "no-examples",
        "int-dtype",
        ">f4",
        "longdouble",
        "beyond-float32",
    ],
)
def test_each_kind_of_malformed_reply_is_rejected(breakage):
    strategy = make_strategy(min_train_replies=3)
    messages = sent(strategy)
    replies = [reply(m, random_grads(i), 5, i) for i, m in enumerate(messages[:2])]
    grads, examples = random_grads(9), 5.0
    if breakage == "missing-tensor":
        del grads["gate.w"]
    elif breakage == "extra-tensor":
        grads["gate.extra"] = np.ones(2, np.float32)
    elif breakage == "no-examples":
        examples = 0
    elif breakage == "beyond-float32":  # finite in float64, inf in the float32 model
        grads["gate.w"] = np.full(grads["gate.w"].shape, 1e300)
    if breakage == "error":
        replies.append(Message(Error(code=1, reason="client crashed"), reply_to=messages[2]))
    elif breakage in ("int-dtype", ">f4", "longdouble"):  # torch.from_numpy would raise
        dtype = {"int-dtype": np.int64, ">f4": ">f4", "longdouble": np.longdouble}[breakage]
        bad = reply(messages[2], grads, examples, 2)
        bad.content[UPDATE]["gate.w"] = Array(np.ones(3, dtype))
        replies.append(bad)
    else:
        replies.append(reply(messages[2], grads, examples, 2))
    with pytest.raises(RoundFailed, match="2 usable replies, at least 3 needed"):
        strategy.aggregate_train(1, replies)


def test_too_few_replies_fail_the_round_and_leave_parameters_untouched():
    strategy = make_strategy(min_train_replies=2)
    before = {k: v.clone() for k, v in strategy.server_step.params.items()}
    first = sent(strategy)[0]
    with pytest.raises(RoundFailed, match="round 1: 1 usable replies"):
        strategy.aggregate_train(1, [reply(first, random_grads(0), 5, 1)])
    for name, value in before.items():
        torch.testing.assert_close(strategy.server_step.params[name], value)


def test_dense_strategy_expects_and_updates_only_the_backbone():
    strategy = make_strategy(("backbone",), optimizer="sgd", backbone_lr=1.0)
    messages = sent(strategy)
    backbone_only = {k: v for k, v in random_grads(4).items() if k.startswith("backbone.")}
    arrays, _ = strategy.aggregate_train(
        1, [reply(m, backbone_only, 1, i) for i, m in enumerate(messages)]
    )
    np.testing.assert_array_equal(arrays["gate.w"].numpy(), PARAMS["gate.w"].numpy())
    np.testing.assert_allclose(
        arrays["backbone.b"].numpy(),
        PARAMS["backbone.b"].numpy() - backbone_only["backbone.b"],
        rtol=1e-6,
    )


def test_summary_names_the_strategy_and_its_optimizers(caplog):
    make_strategy(("backbone",)).summary()
    assert "MetaLearningStrategy: 3 training nodes, 2 target nodes, 3 clients per round" in (
        caplog.text
    )
    assert "{'backbone': 'Adam'}" in caplog.text


def test_sampling_is_seeded_by_partition_and_state_round_trips():
    a, b = make_strategy(clients_per_round=2), make_strategy(clients_per_round=2)
    picks_a = [sorted(m.metadata.dst_node_id for m in sent(a, r)) for r in range(5)]
    state = a.state_dict()
    b.load_state_dict(state)
    assert [sorted(m.metadata.dst_node_id for m in sent(a, r)) for r in range(5)] == [
        sorted(m.metadata.dst_node_id for m in sent(b, r)) for r in range(5)
    ]
    assert len({tuple(p) for p in picks_a}) > 1  # it does sample, not always the same nodes


def test_evaluation_aggregates_over_target_tasks_with_a_95_percent_t_interval():
    strategy = make_strategy(gated_channels=4)
    messages = list(strategy.configure_evaluate(3, strategy.arrays(), ConfigRecord({}), grid=None))
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(TARGET.values())
    accuracies = [0.6, 0.9]
    # per gated channel, the share of the node's queries it opened for
    frequencies = [[1.0, 0.5, 0.0, 1.0], [1.0, 0.25, 0.0, 0.0]]
    replies = [
        Message(
            RecordDict(
                {
                    METRICS: MetricRecord(
                        {
                            NUM_EXAMPLES: 10,
                            "accuracy": acc,
                            "accuracy-transductive": acc,
                            "accuracy-before": 0.2,
                            "loss": 1.0,
                            "flops-ratio": 0.5,
                            "macs": 100.0,
                            "dense-macs": 200.0,
                            "layer-active": [1.0, 0.5],
                            "open-frequency": frequency,
                            "nearest-centroid-accuracy": 0.7,
                            "partition-id": 4 + i,
                        }
                    )
                }
            ),
            reply_to=m,
        )
        for i, (m, acc, frequency) in enumerate(zip(messages, accuracies, frequencies, strict=True))
    ]
    summary = strategy.summarize_evaluation(3, replies)
    metrics = strategy.aggregate_evaluate(3, replies)  # Flower's form: the scalars
    assert dict(metrics) == scalar_figures(summary)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["accuracy_ci95"] == pytest.approx(
        stats.t.ppf(0.975, 1) * np.std(accuracies, ddof=1) / math.sqrt(2)
    )
    assert metrics["target_tasks"] == 2
    assert summary["layer_active"] == [1.0, 0.5]
    # one channel of four varies with the input at each node; two differ between the nodes
    assert metrics["input_dependent_share"] == pytest.approx(0.25)
    assert metrics["node_dependent_share"] == pytest.approx(0.5)
    # per target partition, so that runs on the same target tasks can be paired
    assert summary["task_accuracy"] == {"4": 0.6, "5": 0.9}
    mean, half = mean_ci95([1.0])
    assert mean == 1.0 and math.isnan(half)


class ConnectedNodes:
    """Just enough Grid for sampling: which node ids are still connected."""

    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return self.node_ids


def test_nodes_no_longer_connected_are_not_sampled(caplog):
    strategy = make_strategy(clients_per_round=3)
    grid = ConnectedNodes([101, 103, 104, 105])  # node 102 (partition 2) went away
    messages = list(strategy.configure_train(1, strategy.arrays(), ConfigRecord({}), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [101, 103]
    assert "only 2 training nodes online, 3 wanted" in caplog.text
    grid = ConnectedNodes([101, 102, 103, 105])
    evaluated = strategy.configure_evaluate(1, strategy.arrays(), ConfigRecord({}), grid)
    assert [m.metadata.dst_node_id for m in evaluated] == [105]


def test_a_reply_without_its_measurements_is_left_out():
    strategy = make_strategy(min_train_replies=3)
    messages = sent(strategy)
    replies = [reply(m, random_grads(i), 5, i) for i, m in enumerate(messages)]
    del replies[1].content[METRICS]["query-loss"]
    with pytest.raises(RoundFailed, match="no query-loss in its metrics"):
        strategy.aggregate_train(1, replies)


def test_evaluation_samples_do_not_move_the_training_sampler():
    a, b = make_strategy(clients_per_round=2, eval_nodes=1), make_strategy(clients_per_round=2)
    picks = []
    for strategy in (a, b):
        rounds = []
        for r in range(1, 6):
            rounds.append(sorted(m.metadata.dst_node_id for m in sent(strategy, r)))
            if strategy is a:  # a evaluates one sampled target node every round, b never
                evaluated = strategy.configure_evaluate(
                    r, strategy.arrays(), ConfigRecord({}), grid=None, everyone=False
                )
                assert len(list(evaluated)) == 1
        picks.append(rounds)
    assert picks[0] == picks[1]


def discovery_reply(to: Message, **changes) -> Message:
    info = {"role": "train", "partition-id": 3, **changes.pop("info", {})}
    metrics = {NUM_EXAMPLES: 10, "channels": 1, "image-size": 8, **changes}
    return Message(
        RecordDict({NODE: ConfigRecord(info), METRICS: MetricRecord(metrics)}), reply_to=to
    )


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"info": {"role": "admin"}}, "role"),
        ({"info": {"partition-id": -1}}, "partition-id"),
        ({"channels": 10_000}, "channels"),
        ({"image-size": float("inf")}, "image-size"),
    ],
)
def test_a_node_that_misreports_itself_is_left_out_of_the_federation(change, says):
    query = Message(RecordDict({}), dst_node_id=101, message_type=MessageType.QUERY)
    assert node_problem(discovery_reply(query)) is None
    problem = node_problem(discovery_reply(query, **change))
    assert problem is not None and says in problem


class SlowGrid:
    """A grid on a fake clock whose every ask for replies costs 2 ms per awaited message (as
    Flower's link state checks each one); the reply to message i arrives at 0.1 x (i + 1) s."""

    pull_interval = 0.01  # what the server sets in simulation

    def __init__(self, clock: list[float], count: int, cost: float = 0.002) -> None:
        self.clock, self.cost, self.asks, self.asking = clock, cost, 0, 0.0
        self.sent: dict[str, Message] = {}
        for i in range(count):
            message = Message(RecordDict({}), dst_node_id=i + 1, message_type=MessageType.QUERY)
            message.metadata.__dict__["_message_id"] = f"m{i}"
            self.sent[f"m{i}"] = message

    def push_messages(self, messages):
        return list(self.sent)

    def pull_messages(self, waiting):
        self.asks += 1
        cost = self.cost * len(waiting)
        self.clock[0] += cost
        self.asking += cost
        return [
            Message(RecordDict({}), reply_to=self.sent[m])
            for i, m in enumerate(self.sent)
            if m in waiting and 0.1 * (i + 1) <= self.clock[0]
        ]


def test_asking_for_replies_takes_at_most_a_tenth_of_an_exchange(monkeypatch):
    from server import federation

    clock = [0.0]
    fake_time = SimpleNamespace(
        monotonic=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + s)
    )
    monkeypatch.setattr(federation, "time", fake_time)  # this module's clock only
    grid = SlowGrid(clock, count=200)
    replies = federation.exchange(grid, [], timeout=600)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(grid.sent)
    # the last reply arrives at 20 s, when few are awaited: it is noticed within 0.5 s
    assert 20.0 <= clock[0] <= 20.0 + federation.MAX_PULL_WAIT
    # a fixed 0.01 s poll would spend most of those 20 s asking (0.2 s per ask at first)
    share = grid.asking / clock[0]
    assert share <= federation.PULL_SHARE + 0.02, (share, grid.asks)
    # when asking costs nothing, it asks every pull_interval (replies are noticed at once)
    clock[0], cheap = 0.0, SlowGrid(clock, count=200, cost=0.0)
    federation.exchange(cheap, [], timeout=600)
    assert cheap.asks >= 20.0 / SlowGrid.pull_interval * 0.99
