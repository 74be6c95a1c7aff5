"""``diffopt.diagnostics``: information-theoretic and geometric diagnostics of adaptation.

Notation: θ the meta-learned initialisation, φ = U_T(θ; S) the weights after T
inner steps on the support set S (n examples), Q the query set (m examples),
N classes. The predictive p_w(y|x) is softmax(f_w(x)) (``likelihood="categorical"``)
or 𝒩(f_w(x), σ²) with a declared σ (``likelihood="gaussian", sigma=...``).
Natural logs (nats) unless stated; :func:`nats_to_bits`, ``Diagnostic.to_bits()``.

=====  ==============================================  =========================================
 #     diagnostic                                      functions
=====  ==============================================  =========================================
 1     adaptation KL (forward, reverse, JS, Gaussian)  :func:`adaptation_kl`, :func:`kl_categorical`,
                                                       :func:`js_categorical`, :func:`kl_gaussian`
 2     entropy / cross-entropy change, BALD            :func:`entropy_change`, :func:`bald`,
                                                       :func:`entropy_categorical`, :func:`bald_from_logits`
 3     Fisher information (empirical, true, MC)        :func:`fisher_information`
 3b    information in the adapted weights (Laplace)    :func:`adapted_weight_information`, :func:`weight_information`
 4     gradient alignment, diversity, GSNR, U-stat     :func:`gradient_alignment`, :func:`task_gradients`,
                                                       :mod:`~diffopt.diagnostics.stats`
 5     prequential code length                         :func:`prequential_code_length`
 6     representation change (CKA, effective rank)     :func:`representation_change`, :func:`linear_cka`,
                                                       :func:`effective_rank`
 7     curvature (λ_max, Hutchinson trace, ρ)          :func:`curvature`, :func:`hessian_vector_product`
 8     first- vs second-order meta-gradient            :func:`metagradient_discrepancy`, :func:`metagradients`
 all   everything over a batch of tasks                :func:`diagnose_adaptation` → :class:`Report`
 all   everything for a meta-learner's own inner loop  :func:`diagnose` → :class:`Report`, :func:`headline`
 log   diagnostics during meta-training                :class:`DiagnosticsCallback` (``Trainer(callbacks=...)``)
 CLI   a checkpoint of ``diffopt train``               ``diffopt diagnose CHECKPOINT`` (:mod:`diffopt.cli.diagnose`)
=====  ==============================================  =========================================

Rules every diagnostic follows:

* it returns a :class:`Diagnostic` (or a :class:`DiagnosticGroup` of them) with
  units, estimator settings, per-task values and a 95% CI across tasks;
* it never changes the model's weights, buffers (BatchNorm running statistics),
  training flags or the global RNG stream: evaluation runs in eval mode, or with
  ``bn_mode="batch"`` on copies of the buffers; all sampling uses an explicit
  ``torch.Generator``; the global RNG state is restored around every call;
* per-example gradients come from ``torch.func.vmap(torch.func.grad(...))`` (the
  reference; ``per_example="jacrev"``/``"loop"`` agree with it to rounding);
* squares of means use unbiased U-statistics with standard errors;
* the cost is documented in forward / backward / Hessian-vector-product units
  (``fn.__cost__``), countable with :func:`count_costs`.

Not shipped: mutual-information generalisation bounds for meta-learning (Jose &
Simeone 2021; Chen, Shui & Marchand 2021). For deterministic gradient descent
the mutual information between the (continuous) data and the learned weights is
infinite, so those bounds are vacuous as numbers; only noisy (SGLD-like) inner
and outer loops give finite values, via sums of per-step gradient-incoherence
terms that would have to be logged during training.

Models, weights and tasks follow the engine's conventions (one functional-model
stack, :mod:`diffopt.unroll.functional`): weights are dicts ``name -> tensor``
(or lists in ``named_parameters()`` order), optionally with a leading task
dimension; an adaptation is ``adapt(params, x, y) -> params`` (:func:`sgd_adapt`
is a plain-SGD reference stepping with :class:`diffopt.optim.SGD`'s rule).

Settings: how predictions are scored (``likelihood``, ``sigma``, ``num_classes``),
how the model is evaluated (``bn_mode``, ``per_example``, ``batched``), the seed and
the report's estimator settings are one frozen :class:`DiagnosticSettings`, passed
as ``settings=`` to any diagnostic; each field a diagnostic reads may also be given
as a keyword argument (``sigma=0.5``), which overrides ``settings``.
"""
from ._cost import Cost, CostCount, count_costs, documented_cost
from ._functional import SGDAdapt, SecondOrderUnavailable, per_example_grads, per_example_jacobians, sgd_adapt
from .settings import DiagnosticSettings
from ._likelihood import Likelihood, resolve_likelihood
from ._result import Diagnostic, DiagnosticGroup, bits_to_nats, nats_to_bits
from .alignment import gradient_alignment, task_gradients
from .codelength import block_ends, prequential_code_length
from .curvature import CurvatureConvergenceWarning, curvature, hessian_vector_product
from .entropy import bald, bald_from_logits, entropy_categorical, entropy_change
from .fisher import adapted_weight_information, fisher_information, weight_information
from .kl import adaptation_kl, js_categorical, kl_categorical, kl_gaussian
from .metagrad import metagradient_discrepancy, metagradients
from .report import DIAGNOSTICS, Report, diagnose_adaptation, plot_history
from .learner import LoopAdapt, NotApplicable, diagnose, draw_tasks, headline, inner_learning_rates
from .callback import DiagnosticsCallback
from .representation import effective_rank, linear_cka, representation_change
from .stats import conflict_rate, cosine_matrix, gradient_diversity, gsnr, unbiased_sq_norm_of_mean

__all__ = [
    # results and units
    "Diagnostic", "DiagnosticGroup", "Report", "nats_to_bits", "bits_to_nats",
    # costs
    "Cost", "CostCount", "count_costs", "documented_cost",
    # conventions
    "DiagnosticSettings", "Likelihood", "resolve_likelihood", "sgd_adapt", "SGDAdapt", "SecondOrderUnavailable",
    "per_example_grads", "per_example_jacobians",
    # 1
    "adaptation_kl", "kl_categorical", "js_categorical", "kl_gaussian",
    # 2
    "entropy_change", "bald", "entropy_categorical", "bald_from_logits",
    # 3, 3b
    "fisher_information", "weight_information", "adapted_weight_information",
    # 4
    "gradient_alignment", "task_gradients", "cosine_matrix", "conflict_rate", "gradient_diversity", "gsnr",
    "unbiased_sq_norm_of_mean",
    # 5
    "prequential_code_length", "block_ends",
    # 6
    "representation_change", "linear_cka", "effective_rank",
    # 7
    "curvature", "hessian_vector_product", "CurvatureConvergenceWarning",
    # 8
    "metagradient_discrepancy", "metagradients",
    # all
    "diagnose_adaptation", "DIAGNOSTICS", "plot_history",
    # meta-learners
    "diagnose", "headline", "LoopAdapt", "NotApplicable", "draw_tasks", "inner_learning_rates", "DiagnosticsCallback",
]
