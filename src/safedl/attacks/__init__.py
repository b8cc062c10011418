"""Attacks by category: evasion (white-box and black-box), poisoning, backdoor."""

#: every module that registers a component (``safedl.registry`` imports exactly these; a test checks the list)
COMPONENT_MODULES: tuple[str, ...] = (
    "backdoor.hidden_trigger",
    "backdoor.learned_trigger",
    "backdoor.static_patch",
    "evasion.adversarial_patch",
    "evasion.apgd_ce",
    "evasion.apgd_dlr",
    "evasion.cw_l2",
    "evasion.deepfool",
    "evasion.ensemble",
    "evasion.fab",
    "evasion.fgsm",
    "evasion.hopskipjump",
    "evasion.nes",
    "evasion.pgd",
    "evasion.sparse_rs",
    "evasion.square",
    "evasion.transfer",
    "extraction.copycat",
    "extraction.jacobian_augmentation",
    "poisoning.clean_label",
    "poisoning.feature_collision",
    "poisoning.inject",
    "poisoning.label_consistent",
    "poisoning.label_flipping",
)
