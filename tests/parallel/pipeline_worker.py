"""torchrun worker for tests/parallel/test_pipeline.py: a pipelined RevCol against the same
model in one process with plain autograd, on the same global batch, for two steps."""

import argparse
import json
import os

import torch
import torch.distributed as dist

from revcol_dist.engine.losses import RevColLoss
from revcol_dist.models import create_model
from revcol_dist.parallel.pipeline import PipelineEngine

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", type=int, required=True)
    ap.add_argument("--micro", type=int, required=True)
    ap.add_argument("--zero-stash", action="store_true")
    ap.add_argument("--check-every", type=int, default=1000)
    ap.add_argument("--plain", action="store_true", help="the pipeline model without the reversible engine")
    ap.add_argument("--cost", default="params")
    ap.add_argument("--float64", action="store_true")
    ap.add_argument("--zero", type=int, default=0, help="pipeline.zero: gradients on their owner replica only (2)")
    ap.add_argument("--drift-tolerance", type=float, default=1e-3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    kw = dict(channels=[8, 16, 24, 32], layers=[1, 1, 1, 1], num_columns=4, num_classes=10, drop_path=0.0,
              inter_supv=True)
    torch.manual_seed(0)
    ref = create_model("revcol_tiny", reversible=False, **kw)
    with torch.no_grad():  # |alpha| spread around the clamp, as trained models have them
        for n, p in ref.named_parameters():
            if "alpha" in n:
                p.copy_(torch.empty_like(p).uniform_(0.3, 1.0))
    model = create_model("revcol_tiny", reversible=not args.plain, **kw)
    model.load_state_dict(ref.state_dict())
    dtype = torch.float64 if args.float64 else torch.float32
    ref, model = ref.to(dtype), model.to(dtype)
    engine = PipelineEngine(model, args.stages, args.micro, cost=args.cost, res=32, zero_stash=args.zero_stash,
                            check_every=args.check_every, drift_tolerance=args.drift_tolerance, zero=args.zero,
                            log=print)
    loss_fn = RevColLoss(MEAN, STD)  # the one the stages compute their heads' terms with
    per_replica = 2 * args.micro
    g = torch.Generator().manual_seed(1)
    out = {"rank": rank, "stage": engine.stage, "replica": engine.replica, "columns": engine.columns,
           "partition": engine.partition, "steps": []}
    names = {id(p): n for n, p in model.named_parameters()}
    ref_params = dict(ref.named_parameters())
    for step in range(2):
        images = torch.randn(per_replica * engine.D, 3, 32, 32, generator=g, dtype=dtype)
        labels = torch.randint(0, 10, (per_replica * engine.D,), generator=g)
        ref.zero_grad()
        ref.train()
        # single process, accumulating the same micro-batches (the fp32 rounding of the
        # LayerNorm gradients' sums then matches; the whole batch at once differs by ~1e-5)
        loss_ref = 0.0
        for chunk in range(engine.D * args.micro):
            part = slice(chunk * 2, chunk * 2 + 2)
            l, _ = loss_fn(ref(images[part]), labels[part], images[part])
            (l / (engine.D * args.micro)).backward()
            loss_ref += float(l) / (engine.D * args.micro)
        mine = slice(engine.replica * per_replica, (engine.replica + 1) * per_replica)
        engine.zero_grad()
        micro = list(zip(images[mine].chunk(args.micro), labels[mine].chunk(args.micro)))
        loss = float(engine.forward_backward(micro, loss_fn)[0])
        worst, compared, worst_name = 0.0, 0, None
        for p in engine.parameters():
            if engine.zero is not None and p.grad is None:
                continue  # pipeline.zero=2: another replica owns it
            r = ref_params[names[id(p)]].grad
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            denom = r.norm().item()
            err = (got - r).norm().item() / (denom if denom > 0 else 1.0)
            if err > worst:
                worst, worst_name = err, names[id(p)]
            compared += 1
        out["steps"].append({"loss": loss, "loss_ref": loss_ref, "worst_grad_rel": worst, "worst_name": worst_name,
                             "params_compared": compared, "drift": engine.last_drift,
                             "zero_stash": engine.zero_stash,
                             "overlapped": engine.zero.overlapped if engine.zero is not None else None})
        with torch.no_grad():  # the same SGD step on both, so step 2 starts from trained weights
            for p in engine.parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad
            if engine.zero is not None:
                engine.zero.gather_weights()  # the owners' new weights to the other replica
            for p in ref.parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad
    owned = sum(1 for _ in engine.parameters())
    counts = torch.tensor([owned])
    dist.all_reduce(counts)
    out["params_all_stages"] = int(counts) // engine.D
    out["params_model"] = len(ref_params)
    # the activations' shapes crossed in a header once (one micro-batch shape), not per micro-batch
    out["header_keys"] = len(engine._specs_received) if engine.stage > 0 else len(engine._specs_sent)
    out["timing"] = engine.timing
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
