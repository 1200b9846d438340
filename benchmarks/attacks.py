"""Byzantine training nodes inside a real simulation (issue #30): a registry of node-side attacks.

    python benchmarks/attacks.py --attack alie --attackers 2 [simulate.py overrides ...]
    python benchmarks/attacks.py --attack sign_flip,claim --scale 1e6 ...   # one after the other

Partitions ``0 .. attackers-1`` attack every round they are sampled. The real ClientApp computes
each reply; a Flower mod then rewrites the attackers' (the rest of the federation, the server and
its defences are the real ones). The run folder gets ``attack.json`` (what attacked, and how).

  sign_flip   the honest update times ``-scale``
  gaussian    N(0, sigma^2) in every coordinate instead of the update
  alie        "a little is enough" (Baruch et al. 2019): mean - z x std of honest updates,
              per coordinate, z the largest that still hides the liars among the sampled nodes
  ipm         inner-product manipulation (Xie et al. 2020): -epsilon x the honest mean
  label_flip  the node's own update, its query labels moved to the next class while its support
              labels stay true (labels are node-local: a consistent relabelling would be harmless)
  free_rider  a zero update, with the honest claim
  non_finite  an update of NaNs, which the server leaves out: the attackers' data lost and nothing
              else, the reference an ideal rule would reach (the clean run keeps their data)
  claim       the honest update, ``--claim`` examples claimed
  mac_ratio   the honest update, the deployed MAC ratio reported as ``--ratio`` (0 drags λ down:
              the gates open)

ALIE and IPM need the honest updates' mean and spread: each attacker estimates them from
``--estimate`` honest updates of its own fresh episodes (no node sees another's update). ByzFL's
attacks take the honest gradients as given, and the package imports torchvision, whose wheels on
the registries reachable here do not load beside the CPU build of torch 2.13.0; the attacks are a
few lines each, written here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from scipy.stats import norm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import client.app as client_app_module  # noqa: E402
from gating.federated.protocol import METRICS, NUM_EXAMPLES, PARTITION_KEY, UPDATE  # noqa: E402
from gating.federated.updates import ClientRound, client_update  # noqa: E402
from gating.meta import Batch  # noqa: E402

Update = dict[str, np.ndarray]


@dataclass(frozen=True)
class Options:
    attackers: int = 1
    sampled: int = 10  # nodes per round (ALIE's z depends on it)
    scale: float = 1.0  # sign_flip
    sigma: float = 1.0  # gaussian
    epsilon: float = 0.1  # ipm
    estimate: int = 5  # honest updates an attacker computes for alie / ipm
    claim: float = 1e9  # claim
    ratio: float = 0.0  # mac_ratio


@dataclass
class Reply:
    """What an attacker may change in its reply."""

    update: Update
    metrics: dict[str, float]


def alie_z(sampled: int, attackers: int) -> float:
    """Baruch et al. (2019): with n sampled nodes of which f lie, s = floor(n / 2 + 1) - f honest
    nodes must be won over; z = Phi^-1((n - s) / n)."""
    s = sampled // 2 + 1 - attackers
    return float(norm.ppf((sampled - s) / sampled))


def honest_updates(job: ClientRound, count: int) -> list[Update]:
    """``count`` honest updates of the attacker's own fresh episodes (other seeds than its
    round's)."""
    updates = []
    for k in range(count):
        probe = replace(job, server_round=job.server_round * 1000 + k + 1)
        updates.append({n: t.numpy() for n, t in client_update(probe).update.items()})
    return updates


class FlippedQueries(ClientRound):
    """The node's round with every query label moved to the next class (support labels true)."""

    def episodes(self) -> Callable[[], tuple[Batch, Batch]]:
        draw, ways = super().episodes(), self.task.ways

        def flipped() -> tuple[Batch, Batch]:
            support, query = draw()
            return support, Batch(query.x, (query.y + 1) % ways)

        return flipped


def sign_flip(job: ClientRound, reply: Reply, o: Options) -> Reply:
    return Reply({n: -o.scale * u for n, u in reply.update.items()}, reply.metrics)


def gaussian(job: ClientRound, reply: Reply, o: Options) -> Reply:
    rng = np.random.default_rng([job.cfg.seed, job.task.partition_id, job.server_round])
    update = {n: rng.normal(0.0, o.sigma, u.shape).astype(u.dtype) for n, u in reply.update.items()}
    return Reply(update, reply.metrics)


def alie(job: ClientRound, reply: Reply, o: Options) -> Reply:
    samples = honest_updates(job, o.estimate)
    z = alie_z(o.sampled, o.attackers)
    update = {
        n: np.mean([s[n] for s in samples], 0) - z * np.std([s[n] for s in samples], 0)
        for n in reply.update
    }
    return Reply(update, reply.metrics)


def ipm(job: ClientRound, reply: Reply, o: Options) -> Reply:
    samples = honest_updates(job, o.estimate)
    return Reply(
        {n: -o.epsilon * np.mean([s[n] for s in samples], 0) for n in reply.update}, reply.metrics
    )


def label_flip(job: ClientRound, reply: Reply, o: Options) -> Reply:
    flipped = client_update(
        FlippedQueries(**{f: getattr(job, f) for f in job.__dataclass_fields__})
    )
    return Reply({n: t.numpy() for n, t in flipped.update.items()}, reply.metrics)


def free_rider(job: ClientRound, reply: Reply, o: Options) -> Reply:
    return Reply({n: np.zeros_like(u) for n, u in reply.update.items()}, reply.metrics)


def non_finite(job: ClientRound, reply: Reply, o: Options) -> Reply:
    return Reply({n: np.full_like(u, np.nan) for n, u in reply.update.items()}, reply.metrics)


def claim(job: ClientRound, reply: Reply, o: Options) -> Reply:
    return Reply(reply.update, {**reply.metrics, NUM_EXAMPLES: o.claim})


def mac_ratio(job: ClientRound, reply: Reply, o: Options) -> Reply:
    return Reply(reply.update, {**reply.metrics, "deployed-flops-ratio": o.ratio})


ATTACKS: dict[str, Callable[[ClientRound, Reply, Options], Reply]] = {
    f.__name__: f
    for f in (sign_flip, gaussian, alie, ipm, label_flip, free_rider, non_finite, claim, mac_ratio)
}


def attacking(attack: str, options: Options) -> Callable:
    """A Flower mod: the attackers' training replies, rewritten by ``attack`` (names joined by
    commas: each in turn)."""
    rewrites = [ATTACKS[name] for name in attack.split(",")]

    def mod(message: Message, context: Context, call_next) -> Message:
        reply = call_next(message, context)
        if reply.has_error() or UPDATE not in reply.content.array_records:
            return reply
        if int(reply.content[METRICS][PARTITION_KEY]) >= options.attackers:
            return reply
        job = client_app_module.round_job(message, context)
        update = reply.content[UPDATE]
        honest = Reply(
            {n: update[n].numpy() for n in update},
            {k: v for k, v in reply.content[METRICS].items()},
        )
        lie = honest
        with torch.random.fork_rng():  # the attacker's extra draws leave no trace
            for rewrite in rewrites:
                lie = rewrite(job, lie, options)
        reply.content[UPDATE] = ArrayRecord(
            {
                n: Array(np.ascontiguousarray(u, dtype=update[n].numpy().dtype))
                for n, u in lie.update.items()
            }
        )
        for key, value in lie.metrics.items():
            reply.content[METRICS][key] = value
        return reply

    return mod


def attacked_app(attack: str, options: Options) -> ClientApp:
    app = ClientApp(mods=[attacking(attack, options)])
    app.query()(client_app_module.query)
    app.train()(client_app_module.train)
    app.evaluate()(client_app_module.evaluate)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--attack", required=True, help=f"one of {', '.join(ATTACKS)}, or several joined by commas"
    )
    for field, value in asdict(Options()).items():
        parser.add_argument(f"--{field}", type=type(value), default=value)
    args, overrides = parser.parse_known_args(argv)
    unknown = [name for name in args.attack.split(",") if name not in ATTACKS]
    if unknown:
        parser.error(f"unknown attack {', '.join(unknown)} (choose from {', '.join(ATTACKS)})")
    options = Options(**{f: getattr(args, f) for f in asdict(Options())})
    client_app_module.app = attacked_app(args.attack, options)  # simulate imports it at call time
    import simulate

    sys.argv = ["simulate.py", *overrides]
    code = simulate.main()
    run_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")), None)
    if run_dir is not None and Path(run_dir).is_dir():
        record = {"attack": args.attack, **asdict(options)}
        if "alie" in args.attack.split(","):
            record["z"] = alie_z(options.sampled, options.attackers)
        (Path(run_dir) / "attack.json").write_text(json.dumps(record, indent=1) + "\n")
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
