"""Flatness: does a method do what SAM does? Label noise, curvature, gradient variance, cost.

The decisive test of the ZO-SAM claim. Training labels get symmetric noise (``data.label_noise``:
a fixed fraction of the training labels replaced by another class, drawn by a dedicated
generator seeded with ``data.label_noise_seed`` = the run seed; the test labels stay
clean). Models that can fit their training labels memorise the noise under SGD; SAM
resists it (Foret et al. 2021), so the test accuracy gained over SGD measures whether a
method does what SAM does. Every run goes through the project's own machinery
(``RunConfig`` -> ``zosam.engine.Trainer`` -> ``OptimizerConfig.build`` from the
``OPTIMIZERS`` registry), so any registered optimizer and hyperparameters work:
``--methods sgd sam zosam:q=4 zosam:directions=guided rwp``.

Settings (``SETTINGS``; ``--set key=value`` overrides any run-config field of all of them):

- ``digits``: scikit-learn digits at 8x8 (1,438 training, 359 test images), an MLP
  192-256-256-10, 40 epochs, batch 64, SGD momentum 0.9, lr 0.1 cosine, wd 5e-4, no
  augmentation (dense).
- ``digits-sparse``: the same MLP at 90 % sparsity: a fixed random mask, ERK layer
  densities over both hidden layers (classifier dense).
- ``cifar``: the CIFAR-10 JPEG copy, a fixed class-balanced subset of 2,000 training and
  1,000 test images, a LeNet-shaped CNN (width 8, 128 hidden), 20 epochs, lr 0.05, no
  augmentation.

Grid: settings x noise x methods x rho (the rho grid for every method that takes a
radius, ``rho`` or GSAM's ``rho_max``, and does not fix it in its spec) x seeds; noise,
methods and rho grid are the setting's unless ``--noise``, ``--methods``, ``--rho`` set
them for all (digits settings: noise 0/0.2/0.4/0.6, ten methods, rho 0.1/0.3; cifar: noise
0/0.4, seven methods, rho 0.05). Per run, after
training: final test accuracy; accuracy on the (noisy) training labels and the fraction
of flipped samples the model predicts with their noisy label (memorisation); the top
Hessian eigenvalue of the training loss on a fixed set of training samples (power
iteration with Hessian-vector products, double backward); the SAM-loss gap at
``--gap-rho`` on the same samples, ``L(w + rho g / ||g||) - L(w)`` with g the gradient
there (both restricted to active weights on a sparse host, model in eval mode); the
variance of mini-batch gradients at fixed weights at checkpoints along training
(``--variance-at``: fractions of the epochs; the trace of the covariance of
``--variance-batches`` gradients of training-batch size, drawn by a fixed generator);
passes per step from ``pass_counts`` and seconds per step (training time only).

Aggregation: per (setting, noise, method, rho), over seeds: mean, sample std (ddof 1)
and 95 % interval (Student t) of the test accuracy, the gain over SGD, the means of the
other measures. The decision (``decide``), per setting and noise: SAM's gain over SGD
(SAM at its best rho), decisive when that gain is at least ``3 x max(std_SGD, std_SAM)``
(a setting where SAM gains nothing decides nothing), and every method's fraction of SAM's
gain closed (each method at its best rho); ``--judge`` (default guided ZO-SAM) passes on
a setting when its fraction reaches the setting's target (0.8 dense, 0.6 sparse) with one
backward pass per step. Choosing each method's best rho on the test set is optimistic
for every method alike (every method gets the same grid).

Outputs in ``--out``: ``runs/<key>.json`` per run (reused when the config matches, so an
interrupted benchmark continues; ``--fresh`` reruns), ``flatness_results.json``,
``flatness_table.md`` / ``.csv`` (one row per cell), ``flatness_decision.md`` / ``.csv``,
``flatness_gain_vs_cost.png``, ``flatness_acc_vs_eigenvalue.png``; with
``--tracking-uri`` all of it is logged to MLflow (experiment ``zosam-benchmarks``).

Default (every setting with its grid, 5 seeds: 830 runs): estimated at 30 to 40 minutes
on a quiet 2-core CPU with ``--jobs 2`` (an MLP run takes about 2 s, a LeNet run about
12 s, times the method's cost per step relative to SGD). ``--quick``: digits only, noise 0
and 0.4, 2 seeds, 10 epochs, sgd/sam/zosam/rwp at rho 0.3 (about a minute).

Modules: ``grid`` (settings, run configs), ``measures`` (curvature, SAM-loss gap, gradient
variance), ``run`` (one training and its measures), ``aggregate`` (over seeds, the
decision), ``report`` (tables, plots, the record), ``command`` (flags, reuse, workers).
"""

from zosam.bench.flatness.aggregate import aggregate, best_rows, decide
from zosam.bench.flatness.command import RESULTS_FILE, build_parser, main
from zosam.bench.flatness.grid import BASELINE, GUIDED, QUICK, REFERENCE, SETTINGS, grid, method_label, run_config
from zosam.bench.flatness.measures import (
    gradient_variance,
    hessian_vector_product,
    sam_gap,
    top_hessian_eigenvalue,
)
from zosam.bench.flatness.report import decision_text, pass_cost, plot_acc_vs_eigenvalue, plot_gain_vs_cost
from zosam.bench.flatness.run import run_one

__all__ = [
    "BASELINE", "GUIDED", "QUICK", "REFERENCE", "RESULTS_FILE", "SETTINGS", "aggregate", "best_rows",
    "build_parser", "decide", "decision_text", "gradient_variance", "grid", "hessian_vector_product", "main",
    "method_label", "pass_cost", "plot_acc_vs_eigenvalue", "plot_gain_vs_cost", "run_config", "run_one", "sam_gap",
    "top_hessian_eigenvalue",
]
