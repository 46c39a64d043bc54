"""FGVis (seed 004): a per-pixel mask optimised on the deployed graph, with gradient filtering.

The explanation is ``e = m·x`` with the zero image (in normalised space: the data mean) as
reference, ``m ∈ [0, 1]^{c×H×W}`` (c = 3, or 1 for the single-channel variant). The four games
of the paper:

- preservation (Eq. 2, m₀ = 1) and generation (Eq. 2, m₀ = 0): minimise φ(e) + λ·‖m‖₁;
- deletion (Eq. 3, m₀ = 1) and repression (Eq. 3, m₀ = 0): maximise φ(e) + λ·‖m‖₁;

φ measures how much the explanation loses of the target class: the negative softmax score
(``metric='prob'``) or the cross-entropy with the class as hard target (``metric='ce'``).
‖m‖₁ is taken as the mean over the mask's elements, so λ does not depend on the resolution.

The defence (Eq. 4–6): after every nonlinearity of the graph but the classifier's own, the
gradient of φ is zeroed where the explanation's activation left [min(0, h(x)), max(0, h(x))],
i.e. where it would be more activated than the image (or with the other sign). It needs no
model-specific code: the nonlinearity nodes are found in the ONNX graph
(``runtime.autograd.nonlinearity_outputs``).

Choices where the paper (its supplement is not in the seed) is silent: Adam (lr 0.1) — the
paper says stochastic gradient descent; ``optimizer='sgd'`` is offered — a fixed number of
iterations, the mask clipped to [0, 1] after each step (projected gradient), λ fixed per call
rather than searched. ‖m‖₁ is the mean of the mask, λ = 1 by default, λ = 0 for the generation
game (at m = 0 the explanation holds nothing, the class gradient is far below the sparsity
gradient and the mask would never leave 0; the paper's own defence check runs that game with
no sparsity loss): ``lam`` sets it.
"""
from __future__ import annotations

from ..errors import InvalidInputError
from .base import Context, Method, check_bool, check_choice, check_range
from .registry import register
from .driver import Cancelled

GAMES = ("deletion", "preservation", "generation", "repression")


@register
class FgvisExplainer(Method):
    """FGVis' mask optimisation; the saliency is the mean mask over colours (complement for the
    deletion/repression games). Needs the torch engine (gradients of the exported graph).

    ``game``: one of the four games; ``metric``: 'prob' or 'ce'; ``lam``: λ of the sparsity term
    (None: 1, or 0 for the generation game);
    ``iterations``, ``lr``, ``optimizer`` ('adam' or 'sgd'); ``channels``: 3 (a mask per colour)
    or 1 (one mask for all colours); ``defence``: the gradient filter of §3.2.
    """

    name = "fgvis"
    normalised = True
    needs_activation = False  # the input's mask: any classifier the torch engine runs
    needs_gradients = True

    def __init__(self, *, game: str = "deletion", metric: str = "prob", lam=None, iterations: int = 300,
                 lr: float = 0.1, optimizer: str = "adam", channels: int = 3, defence: bool = True):
        self.game = check_choice("game", game, GAMES)
        self.metric = check_choice("metric", metric, ("prob", "ce"))
        self.lam = (0.0 if self.game == "generation" else 1.0) if lam is None else check_range("lam", lam, low=0.0)
        self.iterations = check_range("iterations", iterations, low=1, high=100_000, kind=int)
        self.lr = check_range("lr", lr, low=0.0, low_open=True)
        self.optimizer = check_choice("optimizer", optimizer, ("adam", "sgd"))
        if isinstance(channels, bool) or not isinstance(channels, int):  # 3.0 and True pass `in (1, 3)`
            raise InvalidInputError(f"channels must be the integer 1 or 3, got {channels!r}")
        self.channels = check_choice("channels", channels, (1, 3))
        self.defence = check_bool("defence", defence)

    @property
    def deletes(self) -> bool:
        return self.game in ("deletion", "repression")

    def explain(self, ctx: Context) -> dict:
        from ..runtime.autograd import GradientGraph

        grad = GradientGraph(ctx.engine)
        torch, meta = grad.torch, ctx.engine.metadata
        t = len(ctx.targets)
        if meta.fixed_batch is not None and (meta.fixed_batch != 1 or t != 1):
            raise InvalidInputError(
                f"FGVis optimises the masks of all targets in one batch (and the defence's bounds at batch 1), but this "
                f"model keeps a fixed batch of {meta.fixed_batch}: explain one target at a time on a batch-1 model, or "
                "re-export it with a dynamic batch")
        with grad.stream():
            x = grad.to_torch(ctx.x).float()  # the mask and Adam in float32, also on an fp16 engine
            dtype = grad.graph.dtype
            bounds = grad.bounds(x.to(dtype)) if self.defence else None
            start = 1.0 if self.game in ("deletion", "preservation") else 0.0
            mask = torch.full((t, self.channels, *x.shape[2:]), start, device=x.device, dtype=torch.float32,
                              requires_grad=True)
            opt = (torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD)([mask], lr=self.lr)
            targets = torch.as_tensor(ctx.targets, device=x.device)
            rows = torch.arange(t, device=x.device)
            use_logits = self.metric == "ce" and meta.logits_output is not None
            field = meta.logits_output if use_logits else meta.probs_output
            sign = -1.0 if self.deletes else 1.0  # Eq. 3 maximises what Eq. 2 minimises
            if ctx.progress:
                ctx.progress(0, self.iterations)
            for step in range(self.iterations):
                if ctx.cancel is not None and ctx.cancel.is_set():
                    raise Cancelled(f"cancelled after {step} of {self.iterations} FGVis iterations")
                out = grad.forward((x * mask).to(dtype), [field], bounds)[field].float()
                if self.metric == "prob":
                    phi = -out[rows, targets]
                elif use_logits:
                    phi = -torch.log_softmax(out, dim=1)[rows, targets]
                else:
                    phi = -torch.log(out[rows, targets].clamp_min(1e-12))
                sparsity = mask.reshape(t, -1).mean(dim=1)
                loss = (sign * (phi + self.lam * sparsity)).sum()  # targets are independent rows
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    mask.clamp_(0.0, 1.0)
                if ctx.progress:
                    ctx.progress(step + 1, self.iterations)
            ctx.forward_passes += t * self.iterations
            m = mask.detach()
            shown = 1.0 - m if self.deletes else m  # deletion's true-colour view: ẽ = x·(1 − m)
            saliency = shown.mean(dim=1)
            explanation = x * shown.expand(t, 3, *x.shape[2:])
            with torch.no_grad():
                final = grad.forward((x * m).to(dtype), [meta.probs_output])[meta.probs_output].float()
            ctx.forward_passes += t
        ctx.extras["iterations"] = self.iterations
        ctx.extras["explanation_score"] = float(final[0, ctx.targets[0]])
        return {"raw": grad.from_torch(saliency), "masks": grad.from_torch(m),
                "explanations": grad.from_torch(explanation)}
