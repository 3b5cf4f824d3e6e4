"""Device paths no GPU has run yet, checked on the CPU (issue 17, items 18, 20-22, 24-26,
28): spies on the RNG and copy calls, simulated GPU counts, and tensors made without
``device=`` caught by a ``meta`` default device."""

import logging
from types import SimpleNamespace

import pytest
import torch

from awt_engine.backbone import devices
from awt_engine.labels import LabelSet
from awt_engine.scorers import AWTConfig
from awt_engine.scoring import awt_scores_from_logits, awt_solve
from tests.awt_reference import random_embeds, ref_awt_scores

# ---------------------------------------------------------------------------------------
# Fakes of a CUDA machine's RNG calls (no CUDA here): which device is current, which
# device's state is read and restored, which generator is seeded.


class _FakeCudaRng:
    def __init__(self, monkeypatch):
        self.current = 0
        self.calls: list[tuple] = []
        fake = self

        class device:  # torch.cuda.device(idx): makes idx current inside
            def __init__(self, idx):
                self.idx = torch.device("cuda", idx).index if not isinstance(idx, int) else idx

            def __enter__(self):
                self.prev, fake.current = fake.current, self.idx

            def __exit__(self, *exc):
                fake.current = self.prev

        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self._get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self._set)
        monkeypatch.setattr(torch.cuda, "manual_seed", self._seed)
        monkeypatch.setattr(torch.cuda, "manual_seed_all", self._seed_all)

    @staticmethod
    def _index(d):
        return d if isinstance(d, int) else torch.device(d).index

    def _get(self, d="cuda"):
        self.calls.append(("get", self._index(d)))
        return torch.zeros(8, dtype=torch.uint8)

    def _set(self, state, d="cuda"):
        self.calls.append(("set", self._index(d)))

    def _seed(self, seed):
        self.calls.append(("seed", self.current, seed))

    def _seed_all(self, seed):
        self.calls.append(("seed_all", seed))


def _no_cuda_seeding(monkeypatch) -> list:
    """Records every seeding of CUDA generators (torch.manual_seed seeds them all)."""
    calls: list = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: calls.append(("all", s)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: calls.append(("one", s)))
    return calls


# ---------------------------------------------------------------------------------------
# 22: CLAMP's dropout RNG is the model's device's


def test_clamp_seeds_the_dropout_rng_of_its_own_gpu(monkeypatch):
    from awt_engine.methods.clamp import CLAMP

    cuda = _FakeCudaRng(monkeypatch)
    model = SimpleNamespace(device=torch.device("cuda", 1))
    g = torch.Generator().manual_seed(3)
    seed = int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(3)))
    outside = torch.random.get_rng_state()
    with CLAMP._dropout_rng(model, g):
        inside = torch.rand(4)
    # cuda:1's generator is forked and seeded while cuda:1 is current; cuda:0 untouched
    assert cuda.calls == [("get", 1), ("seed", 1, seed), ("set", 1)]
    # the CPU generator too, from the same seed, and given back after
    assert torch.equal(inside, torch.rand(4, generator=torch.Generator().manual_seed(seed)))
    assert torch.equal(torch.random.get_rng_state(), outside)


def test_clamp_seeds_and_forks_the_mps_rng(monkeypatch):
    from awt_engine.methods.clamp import CLAMP

    calls = []
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda d="mps": calls.append("get") or 0)
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda s, d="mps": calls.append("set"))
    monkeypatch.setattr(torch.mps, "manual_seed", lambda s: calls.append(("seed", s)))
    g = torch.Generator().manual_seed(5)
    seed = int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(5)))
    with CLAMP._dropout_rng(SimpleNamespace(device=torch.device("mps")), g):
        pass
    assert calls == ["get", ("seed", seed), "set"]


# ---------------------------------------------------------------------------------------
# 28: a CPU-only fork never seeds (resets) the caller's CUDA generators


def test_seeded_rng_on_the_cpu_leaves_every_cuda_generator_alone(monkeypatch):
    calls = _no_cuda_seeding(monkeypatch)
    outside = torch.random.get_rng_state()
    with devices.seeded_rng(11):
        a = torch.rand(5)
    assert calls == []
    assert torch.equal(a, torch.rand(5, generator=torch.Generator().manual_seed(11)))
    assert torch.equal(torch.random.get_rng_state(), outside)


def test_random_init_of_a_backbone_never_seeds_cuda(monkeypatch):
    from awt_engine.backbone import model

    calls = _no_cuda_seeding(monkeypatch)
    with model._seeded_init(7):
        a = torch.rand(3)
    assert calls == []
    assert torch.equal(a, torch.rand(3, generator=torch.Generator().manual_seed(7)))


def test_epalm_prepare_never_seeds_cuda(monkeypatch, train_clip_dir, tmp_path):
    from awt_engine.backbone import load_backbone
    from awt_engine.methods import get_method
    from tests.fixtures_llm import build_tiny_chat_model

    lm = str(build_tiny_chat_model(tmp_path / "lm", hidden=64, layers=4))
    spec = get_method("epalm")
    cfg = spec.config(llm=lm, start_layer=2, end_layer=4, n_levels=2, prompt_len=4)
    net = spec.build(load_backbone(train_clip_dir, device="cpu"), cfg)
    labels = LabelSet(("amber", "cobalt"), "a photo of a {}")
    calls = _no_cuda_seeding(monkeypatch)
    outside = torch.random.get_rng_state()
    net.prepare(labels, seed=4)
    first = [p.detach().clone() for p in net.connectors.parameters()]
    assert calls == []
    assert torch.equal(torch.random.get_rng_state(), outside)
    torch.rand(10)  # another caller state: the same weights from the same seed
    net.prepare(labels, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first, net.connectors.parameters(), strict=True))


# ---------------------------------------------------------------------------------------
# 25: non_blocking copies only into CUDA


class _Stop(Exception):
    pass


def _spy_to(monkeypatch, stop=False):
    seen = []
    real = torch.Tensor.to

    def to(self, *args, **kwargs):
        target = next((a for a in args if isinstance(a, torch.device | str)), None)
        target = kwargs.get("device", target)
        if target is not None and torch.device(target).type != "cpu":
            seen.append((torch.device(target).type, kwargs.get("non_blocking", False)))
            if stop:
                raise _Stop
            return self  # no such device here: the copy is what is checked
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    return seen


def test_views_copy_to_mps_synchronously_and_to_cuda_asynchronously(monkeypatch):
    from awt_engine.inputs.views import _on_device

    seen = _spy_to(monkeypatch)
    pixels = torch.zeros(3, 4, 4, dtype=torch.uint8)
    _on_device(pixels, torch.device("mps"))
    _on_device(pixels, torch.device("cuda", 0))
    assert seen == [("mps", False), ("cuda", True)]


@pytest.mark.parametrize("kind,non_blocking", [("mps", False), ("cuda", True)])
def test_encode_images_copies_to_mps_synchronously(monkeypatch, tiny_clip_dir, kind, non_blocking):
    from awt_engine.backbone import load_backbone

    bb = load_backbone(tiny_clip_dir, device="cpu")
    bb.device = torch.device(kind)  # as loaded there; the spy stops at the copy
    r = bb.preprocess.size
    seen = _spy_to(monkeypatch, stop=True)
    with pytest.raises(_Stop):
        bb.encode_images(torch.zeros(2, 3, r, r), grad=True)
    assert seen == [(kind, non_blocking)]


# ---------------------------------------------------------------------------------------
# 26: the scorer's default budget on CUDA is fixed, and the budget never moves iterations


def test_the_cuda_budget_does_not_follow_free_memory(monkeypatch):
    from awt_engine import scoring

    free = iter([40 << 30, 3 << 30])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (next(free), 80 << 30))
    props = SimpleNamespace(total_memory=80 << 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: props)
    dev = torch.device("cuda", 0)
    assert scoring.default_memory_budget(dev) == scoring.default_memory_budget(dev) == 2 << 30
    props.total_memory = 4 << 30  # a small card: a quarter of it, still not free memory
    assert scoring.default_memory_budget(dev) == 1 << 30
    assert scoring.default_memory_budget(torch.device("cpu")) == 1 << 30


def test_iterations_do_not_depend_on_the_budget_either_side_of_the_switch():
    """Class chunks (budget below one image), one image a block (weights from separate
    matmuls vs from the block), all images at once (the CUDA default): the same
    iteration counts and, to rounding, the float64 reference's scores."""
    from awt_engine import scoring

    B, V, C, P = 4, 7, 13, 9
    img, txt = random_embeds(B, V, C, P, 16, seed=21, peaked=1.0)
    ref = ref_awt_scores(img, txt)
    img32, txt32 = torch.from_numpy(img).float(), torch.from_numpy(txt).float()
    per_image = C * V * P * 4 * 3
    budgets = (1, per_image - 1, per_image, 2 * per_image, scoring._DEFAULT_CUDA_BUDGET)
    outs = [awt_solve(img32, txt32, memory_budget=b) for b in budgets]
    for out in outs:
        assert out.iterations.tolist() == outs[-1].iterations.tolist()
        torch.testing.assert_close(out.scores.double(), torch.from_numpy(ref), rtol=0, atol=1e-4)
    assert len(set(outs[-1].iterations.tolist())) > 1  # a real per-image stop


# ---------------------------------------------------------------------------------------
# 28: no tensor of the scorer is made without device= (a meta default device catches it)


@pytest.mark.parametrize("budget", [None, 1, 1 << 30])
@pytest.mark.parametrize("eps", [0.1, 0.005])  # kernel form and log domain
def test_the_scorer_makes_no_tensor_on_the_default_device(budget, eps):
    img, txt = random_embeds(3, 5, 4, 6, 8, seed=5)
    img, txt = torch.from_numpy(img).float(), torch.from_numpy(txt).float()
    cfg = AWTConfig(eps=eps, max_iter=30)
    want = awt_solve(img, txt, config=cfg, memory_budget=budget)
    logits = 100.0 * torch.einsum("bvd,cpd->bvcp", img, txt)
    want_logits = awt_scores_from_logits(logits, config=cfg, memory_budget=budget)
    with torch.device("meta"):  # any factory call without device= lands on meta and fails
        got = awt_solve(img, txt, config=cfg, memory_budget=budget, keep_plans=budget != 1)
        got_logits = awt_scores_from_logits(logits, config=cfg, memory_budget=budget)
    assert got.scores.device.type == "cpu"
    assert torch.equal(got.scores, want.scores)
    assert torch.equal(got_logits.scores, want_logits.scores)


def test_clip_inference_makes_no_tensor_on_the_default_device(tiny_clip_dir):
    """The backbone and views of a classify run under a meta default device."""
    import awt_engine

    clf = awt_engine.create_classifier(
        model=tiny_clip_dir, classes=["red", "green", "blue"], views=3, device="cpu"
    )
    image = torch.zeros(3, 40, 30, dtype=torch.uint8)
    image[0] = 200
    want = clf.predict([image], top_k=3)
    clf.class_embeddings()  # text encoded before, as every run caches it
    with torch.device("meta"):
        got = clf.predict([image], top_k=3)
    # equal to rounding: under a device mode torch takes its non-fused attention path
    assert [x["label"] for x in got[0]] == [x["label"] for x in want[0]]
    for a, b in zip(got[0], want[0], strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


# ---------------------------------------------------------------------------------------
# 24: LLaMP's frozen caches do not depend on an enclosing autocast


def test_llamp_caches_are_the_same_with_and_without_autocast(train_clip_dir, tmp_path):
    from awt_engine.backbone import load_backbone
    from awt_engine.methods import get_method
    from tests.fixtures_llm import build_tiny_chat_model

    lm = build_tiny_chat_model(tmp_path / "lm", hidden=64, layers=3)
    spec = get_method("llamp")
    tiny = dict(n_tokens=4, prompt_depth=2, visual_prompt_depth=1, lora_rank=2)
    tiny |= dict(lora_alpha=4.0, lora_start=1, lora_end=2, self_description_tokens=8)
    net = spec.build(load_backbone(train_clip_dir, device="cpu"), spec.config(llm=str(lm), **tiny))
    net.use_cache_root(None)  # memory only: each build below is computed
    labels = LabelSet(("cat", "sea_lion"), "a photo of a {}", (("furry.",), ("wet.",)))
    net.prepare(labels, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the first training step
        described = net.self_descriptions(labels)
        trained = net.prefix_cache(labels)
    net._kv.clear()
    net._described.clear()
    plain = net.prefix_cache(labels)  # as classify builds it
    assert net.self_descriptions(labels) == described
    assert plain.keys.dtype == torch.float32
    assert torch.equal(plain.keys, trained.keys) and torch.equal(plain.values, trained.values)


# ---------------------------------------------------------------------------------------
# 18, 20, 21: Ray's pool sized from the cluster, devices mapped inside actors, quiet


@pytest.fixture
def ray_mod():
    return pytest.importorskip("ray")


@pytest.fixture
def cluster(monkeypatch, ray_mod):
    from awt_engine import distributed

    def set_cluster(resources, local=True):
        monkeypatch.setattr(ray_mod, "cluster_resources", lambda: dict(resources))
        monkeypatch.setattr(distributed, "_local_instance", local)

    return set_cluster


@pytest.mark.parametrize(
    "resources,device,want",
    [
        ({"CPU": 2.0}, "auto", (1, 0.0, 1.0)),  # was 2 actors: "may hang forever"
        ({"CPU": 1.0}, "cpu", (1, 0.0, 0.25)),
        ({"CPU": 5.0}, "cpu", (4, 0.0, 1.0)),
        ({"CPU": 64.0}, "cpu", (8, 0.0, 7.0)),  # at most 8 model copies by default
        ({"CPU": 16.0, "GPU": 4.0}, "auto", (4, 1.0, 1)),  # one actor per GPU
        ({"CPU": 3.0, "GPU": 8.0}, "cuda:1", (2, 1.0, 1)),  # each GPU actor needs a CPU
    ],
)
def test_the_default_pool_fits_the_cluster(cluster, resources, device, want):
    from awt_engine import distributed

    cluster(resources)
    assert distributed.pool(device, None, None, None) == want
    n, gpus, cpus = want
    assert n * cpus <= max(resources["CPU"] - (0 if gpus else 1), cpus)
    assert n * gpus <= resources.get("GPU", 0)


def test_the_api_and_cli_leave_the_pool_size_to_the_cluster():
    import inspect

    from awt_engine import distributed, ray_eval
    from awt_engine.cli import classify, evaluate

    for fn in (distributed.classify_dataset, ray_eval.evaluate_dataset):
        assert inspect.signature(fn).parameters["concurrency"].default is None
    for fn in (classify.classify, evaluate.eval_command):
        assert inspect.signature(fn).parameters["concurrency"].default is None


def test_cuda_with_no_gpus_for_the_actors_is_refused(cluster):
    from awt_engine import distributed

    cluster({"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(ValueError, match=r"--device cuda:1 with --num-gpus 0"):
        distributed.pool("cuda:1", 0, None, None)
    cluster({"CPU": 8.0})  # a local instance without GPUs: the actor could never start
    with pytest.raises(ValueError, match=r"1 GPU\(s\) .* has 0"):
        distributed.pool("cuda", None, None, None)
    cluster({"CPU": 8.0}, local=False)  # a cluster may scale up: left to Ray
    assert distributed.pool("cuda", None, None, 2) == (2, 1.0, 1)


def _built_device(monkeypatch, ray_mod, device, gpu_ids):
    import awt_engine.classifier
    from awt_engine.distributed import ClassifierSpec

    got = {}
    monkeypatch.setattr(ray_mod, "get_gpu_ids", lambda: list(gpu_ids))
    monkeypatch.setattr(awt_engine.classifier, "create_classifier", lambda **kw: got.update(kw))
    ClassifierSpec({"model": "m", "device": device}).build()
    return got["device"]


def _one_visible_gpu(monkeypatch):
    """Inside a Ray actor given GPU 1: CUDA_VISIBLE_DEVICES=1, so torch sees one GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", raising=False)


@pytest.mark.parametrize("device", ["cuda:1", "cuda", "auto", "CUDA:3"])
def test_an_actors_gpu_is_cuda_0_whatever_the_driver_asked(monkeypatch, ray_mod, device):
    _one_visible_gpu(monkeypatch)
    with pytest.raises(ValueError, match="1 CUDA device"):
        devices.resolve_device("cuda:1")  # what every actor did before
    got = _built_device(monkeypatch, ray_mod, device, gpu_ids=[1])
    assert devices.resolve_device(got) == torch.device("cuda", 0)


def test_an_actor_given_no_gpu_computes_on_the_cpu(monkeypatch, ray_mod):
    _one_visible_gpu(monkeypatch)  # Ray no longer hides the machine's GPUs from it
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert devices.resolve_device("auto").type == "cuda"  # what it picked before
    assert _built_device(monkeypatch, ray_mod, "auto", gpu_ids=[]) == "cpu"
    assert _built_device(monkeypatch, ray_mod, "cpu", gpu_ids=[0]) == "cpu"  # asked: kept


def test_local_actors_are_not_restarted_and_no_deprecation_leaks(cluster, recwarn):
    from awt_engine import distributed

    seen = {}

    class FakeDs:
        def map_batches(self, fn, **kwargs):
            import warnings

            if "max_restarts" in kwargs:  # as Ray Data says of its catch-all keywords
                warnings.warn("`ray_remote_args` is deprecated and will be removed", stacklevel=2)
            seen.update(kwargs)
            return "ds"

    cluster({"CPU": 2.0}, local=True)
    assert distributed._map_actors(FakeDs(), object, {}, 1, 0.0, 1.0, None) == "ds"
    assert seen["max_restarts"] == 0 and seen["batch_size"] == 16
    assert not [w for w in recwarn if "deprecated" in str(w.message)]
    seen.clear()
    cluster({"CPU": 2.0}, local=False)  # a cluster keeps Ray Data's fault tolerance
    distributed._map_actors(FakeDs(), object, {}, 1, 1.0, 1, None)
    assert "max_restarts" not in seen and seen["num_gpus"] == 1.0


def test_init_quiets_what_is_not_the_users_business(monkeypatch, ray_mod):
    from awt_engine import distributed

    names = distributed._QUIET + distributed._QUIET_LOCAL
    levels = {n: logging.getLogger(n).level for n in names}
    calls = []
    monkeypatch.setattr(ray_mod, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_mod, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(distributed, "_local_instance", False)
    try:
        distributed.init()
        assert calls and calls[0]["log_to_driver"] is False
        assert distributed._local_instance
        for n in names:
            assert not logging.getLogger(n).isEnabledFor(logging.WARNING), n
        # Ray's own token notice, as ray.init logs it for a new local instance
        from ray._private.authentication import authentication_token_setup as auth

        assert auth.logger.name in distributed._QUIET
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
