"""The experiments' config schema, in code: every key, its type (by its default's) and its
default. `config.validate` checks a config against it; `configs/default.py` is this default.

The default itself is the BN paper's net on MNIST-1D, with and without BN. Sections that only
one family of studies reads (`sweep`, `probes`, `renorm`, `hessian`) are checked by that family's own
`validate`; every other key by the core's.
"""

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  """Every key a config may hold, with its default; the result is locked."""
  config = ml_collections.ConfigDict()
  # Which study runs: a name in experiments/registry.py (compare, lr_sweep, noisy_bn, ...).
  config.study = "compare"
  config.seed = 0
  # Which nets to train: "bn" (BatchNorm before each activation) and/or "plain".
  config.variants = ("bn", "plain")

  config.data = ml_collections.ConfigDict()
  config.data.name = "mnist1d"  # mnist1d | fashion_mnist | mnist | synthetic
  config.data.path = ""  # IDX directory; "" = Debian's fashion-mnist location
  config.data.num_samples = 5000  # mnist1d and synthetic only
  config.data.synthetic_shape = (8,)  # synthetic only

  config.model = ml_collections.ConfigDict()
  config.model.name = "mlp"  # mlp | cnn
  config.model.hidden = (100, 100, 100)
  config.model.activation = "sigmoid"
  config.model.residual = False  # h ← h + act(layer(h)) after the first layer
  config.model.init_std = 0.0  # > 0: N(0, init_std²) weights; 0: LeCun normal
  config.model.cnn_features = (16, 32)
  config.model.bn_momentum = 0.99
  # jaxbn | jaxbn-xla (no C++ kernels) | jaxbn-fast (one-pass variance) | flax | equinox (the
  # MLP written in Equinox with jaxbn.equinox.BatchNorm; needs jaxbn[equinox])
  config.model.bn_impl = "jaxbn"
  config.model.gradient = "analytic"  # analytic | autodiff

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"  # sgd | adam
  config.optimizer.learning_rate = 0.5
  config.optimizer.momentum = 0.0  # sgd only
  config.optimizer.schedule = "cosine"  # constant | cosine (decay to 0 at num_steps)

  config.batch_size = 60
  config.num_steps = 6000
  config.eval_every = 250  # evaluation interval: one jitted lax.scan over these steps
  config.steps_per_call = 0  # > 0: steps per jitted call instead (must divide eval_every)
  config.checkpoint_every = 2000  # a multiple of eval_every
  config.data_parallel = False  # shard the batch over every device of every process

  # Diagnostics at each evaluation (MLP): the input of `unit` in the last hidden layer
  # (BN paper Fig. 1b, c), saturated fractions |x| > saturation and gradient norms per layer.
  config.diagnostics = ml_collections.ConfigDict()
  config.diagnostics.num_examples = 1000
  config.diagnostics.unit = 0
  config.diagnostics.saturation = 4.0

  # lr_sweep only.
  config.sweep = ml_collections.ConfigDict()
  config.sweep.learning_rates = (0.01, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0)

  # Santurkar et al.'s probes only (studies noisy_bn | ics | landscape, studies/ics/).
  config.probes = ml_collections.ConfigDict()
  config.probes.noise_mean_range = 0.5  # noisy BN: the noise's mean each step ~ U(-r, r)
  config.probes.noise_std_range = (0.5, 1.0)  # noisy BN: the noise's std each step ~ U(lo, hi)
  config.probes.step_multiples = (0.25, 0.5, 1.0, 2.0, 4.0)  # landscape: η / learning rate

  # renorm_groups and renorm_noniid only (studies/renorm/): each run trains
  # one net per seed, vmapped, for every normalization and group size.
  config.renorm = ml_collections.ConfigDict()
  config.renorm.seeds = (0, 1, 2)
  config.renorm.norms = ("bn", "renorm", "plain")  # plain: no BN (group sizes do not apply)
  config.renorm.group_sizes = (60,)  # examples per BN group: ghost batches when < batch_size
  config.renorm.rmax = 3.0  # renorm_clipping (Keras 2's names); rmin = 1 / rmax
  config.renorm.dmax = 5.0
  config.renorm.momentum = 0.99  # renorm_momentum
  config.renorm.warmup_steps = 0  # relax the clipping from rmax = 1, dmax = 0 over these
  config.renorm.classes_per_batch = 0  # > 0: non-i.i.d. training batches of this many classes
  config.renorm.recompute_batches = 100  # training batches the recomputed statistics average

  # Ghorbani et al.'s Hessian studies only (hessian_spectrum | hessian_population |
  # hessian_agreement, studies/hessian/): one run per variant and seed.
  config.hessian = ml_collections.ConfigDict()
  config.hessian.seeds = (0, 1, 2)
  config.hessian.probe_steps = (100, 500, 1000)  # multiples of eval_every
  config.hessian.batches = 16  # the Hessian's sample: batches x batch_size training examples
  config.hessian.lanczos_order = 60  # Lanczos steps per run (HVPs)
  config.hessian.density_runs = 3  # SLQ's random starts; the first also gives the top-k
  config.hessian.top_k = 20  # eigenpairs kept; the last stands for the bulk's edge
  config.hessian.concentration_k = 10  # the gradient's share in the top-k eigenspace
  # Outliers: the eigenvalues above factor x the top_k-th (the bulk's edge), per factor.
  config.hessian.outlier_factors = (2.0, 5.0, 10.0)
  config.hessian.trace_samples = 8  # Hutchinson's Rademacher vectors
  config.hessian.population_every = 50  # hessian_population: steps between refreshes
  config.hessian.population_batches = 20  # training batches the population statistics pool
  config.hessian.hvp_vectors = 3  # hessian_agreement: random vectors per evaluation

  config.lock()
  return config
