"""PUMIT's token-reconstruction pretraining (Luo et al., arXiv 2312.07630) in two nnU-Net runs:

    nnunet_mim add-config sac-vit -d D                                    # configuration 3d_sac_vit
    nnUNetv2_train D 3d_sac_vit all -tr VisualTokenizerTrainer            # stage 1: visual tokenizer
    nnUNetv2_train D 3d_sac_vit all -tr TokenMIMPretrainer                # stage 2: finds the stage-1 tokenizer
    nnUNetv2_train D 3d_sac_vit 0 -tr nnUNetTrainerSACViTFinetune -pretrained_weights \\
        $nnUNet_results/DatasetD_*/TokenMIMPretrainer__nnUNetPlans__3d_sac_vit/fold_all/checkpoint_final.pth

Stage 2 looks for ``$nnUNet_results/<dataset>/VisualTokenizerTrainer__<plans>__<configuration>/fold_all/
checkpoint_final.pth`` (same dataset, plans and configuration); ``nnUNet_mim_tokenizer=/path/to/checkpoint.pth`` (or
a fold folder) overrides it. See documentation/pumit.md.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.paths import nnUNet_results
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from timm.layers import trunc_normal_
from torch import nn
from torch.nn import functional as F
from torch.profiler import record_function

from nnunet_mim.architectures.sac_vit import SACViTPretrainNet, SACViTSeg
from nnunet_mim.architectures.tokenizer import (
    SACPatchDiscriminator,
    TokenizerConfig,
    VisualTokenizer,
    VisualTokenizerNet,
)
from nnunet_mim.nnunet import settings
from nnunet_mim.core.losses.gan import (
    build_perceptual_loss,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    sample_slices,
    update_gan_gate,
)
from nnunet_mim.core.losses.tokens import entropy, prior_regularization, soft_cross_entropy
from nnunet_mim.core.masking import random_token_mask
from nnunet_mim.core.patches import token_mask_to_voxels
from nnunet_mim.nnunet.preview import save_codebook_usage, save_volume_panels
from nnunet_mim.core.sac import degree_of_anisotropy, sac_token_size
from nnunet_mim.nnunet.eva02_weights import load_eva02_mask_token
from nnunet_mim.nnunet.versions import network_builder, trainer_name
from nnunet_mim.trainers.base import MIMPretrainerBase
from nnunet_mim.trainers.sac_vit import (
    EVA02_WEIGHTS_ENV,
    NO_WEIGHT_DECAY_NAMES,
    SACViTPretrainerBase,
    build_sac_vit_seg,
    make_adamw,
)
from nnunet_mim.nnunet.weights import load_checkpoint, state_dict_of, unwrap

TOKENIZER_CONFIG_KEY = "nnunet_mim_tokenizer_config"
TOKENIZER_ENV = settings.setting("nnUNet_mim_tokenizer").name
TOKENIZER_TRAINER = "VisualTokenizerTrainer"


# ================================================================================================================
# previews / plots
# ================================================================================================================
def tokens_to_voxels(values: torch.Tensor, grid, token_size) -> np.ndarray:
    """``[N]`` per-token values (raster order) -> a voxel volume (nearest)."""
    return token_mask_to_voxels(values.detach().float().cpu()[None], grid, token_size)[0, 0].numpy()


# ================================================================================================================
# stage 1: visual tokenizer
# ================================================================================================================
def tokenizer_config_from_state(state: dict[str, torch.Tensor], prefix: str = "tokenizer.") -> TokenizerConfig:
    """Rebuild a :class:`TokenizerConfig` from the shapes of a (stage-1) state dict."""
    w0 = state[f"{prefix}encoder.down.0.weight"]
    c2 = state[f"{prefix}encoder.down.3.weight"].shape[0]
    c3 = state[f"{prefix}encoder.down.6.weight"].shape[0]
    emb = state[f"{prefix}quantize.embedding.weight"]
    return TokenizerConfig(int(w0.shape[1]), (int(w0.shape[0]), int(c2), int(c3)), int(emb.shape[0]),
                           int(emb.shape[1]))


class VisualTokenizerTrainer(MIMPretrainerBase):
    """Stage 1 (PUMIT "Visual Tokenizer Details"): SAC tokenizer with soft tokens, trained with

    ``L = L1 + w_p LPIPS + lambda1 KL(E[p] || U) - lambda2 mean KL(p || U) + [gate] w_gan (-D(x_rec))`` (eq. 4, 5)

    and a hinge patch discriminator. The gate (Iverson bracket of eq. 5) is open while
    ``max(EMA_0.9(disc loss), disc loss) <= gan_threshold``. Two optimisers: the tokenizer and the discriminator are
    two sets of AdamW parameter groups in one ``torch.optim.AdamW`` (per-parameter moments, their own lr: the
    official 1e-4 / 1e-3, weight decay 0.05), stepped together after the single backward, each clipped separately.
    nnU-Net's checkpoint therefore holds both players and both optimiser states (``--c`` resumes exactly; the gate's
    EMA is a buffer of the network). The reported ``loss`` (and the best-checkpoint stand-in) is the reconstruction
    objective ``L1 + w_p LPIPS``; the optimised objective adds the regulariser, the gated GAN term and the
    discriminator loss.
    """

    channels: tuple[int, int, int] = (128, 256, 512)
    num_embeddings: int = 1024
    embedding_dim: int = 512
    discriminator_channels: tuple[int, ...] = (128, 256, 512)
    prior_weight: float = 0.03  # lambda1 (official README run: quant_weight 0.03)
    sharpness_weight: float = 1.0  # lambda2 (official README run: entropy_weight 1)
    perceptual_weight: float = 1.0
    max_perceptual_slices: int = 24
    gan_weight: float = 3e-3
    gan_threshold: float = 0.025
    gan_ema_momentum: float = 0.9
    discriminator_lr_scale: float = 10.0  # official: D lr 1e-3 vs G lr 1e-4
    grad_clip_norm: float = 12.0
    loss_components = ("l1", "perceptual", "prior_kl", "token_entropy", "gan_g", "disc", "gan_on")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-4
        self.weight_decay = 0.05
        self.perceptual = None
        self.perceptual_status = ""
        self._usage = None

    @classmethod
    def tokenizer_config(cls, num_input_channels: int) -> TokenizerConfig:
        return TokenizerConfig(num_input_channels, tuple(cls.channels), cls.num_embeddings, cls.embedding_dim)

    @network_builder
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> VisualTokenizerNet:
        da = degree_of_anisotropy(configuration_manager.spacing)
        tokenizer = VisualTokenizer(cls.tokenizer_config(num_input_channels), da)
        return VisualTokenizerNet(tokenizer, SACPatchDiscriminator(num_input_channels, cls.discriminator_channels))

    @property
    def net(self) -> VisualTokenizerNet:
        return unwrap(self.network)

    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # no segmentation decoder

    def initialize(self):
        patch = list(self.configuration_manager.patch_size)
        da = degree_of_anisotropy(self.configuration_manager.spacing)
        token = sac_token_size(da)
        if len(patch) != 3 or any(p % t for p, t in zip(patch, token)):
            raise ValueError(
                f"The visual tokenizer needs a patch divisible by its token size {token} (DA {da}); configuration "
                f"'{self.configuration_name}' has {patch}. Train both PUMIT stages on a SAC-ViT configuration, whose "
                f"patch is rounded to the token size: `nnunet_mim add-config sac-vit -d {self.plans_manager.dataset_name}"
                f"` then `nnUNetv2_train ... 3d_sac_vit all -tr {type(self).__name__}`.")
        super().initialize()
        # the tokenizer's configuration travels in every checkpoint (nnU-Net saves ``init_args``): stage 2 rebuilds it
        self.my_init_kwargs[TOKENIZER_CONFIG_KEY] = self.net.tokenizer.config.to_dict()
        self.perceptual, self.perceptual_status = build_perceptual_loss(settings.read("nnUNet_mim_vgg16_weights"),
                                                                        settings.read("nnUNet_mim_lpips_weights"))
        if self.perceptual is not None:
            self.perceptual.to(self.device)
        c = self.net.tokenizer.config
        self.print_to_log_file(
            f"Visual tokenizer: DA {da}, token {token} voxels, patch {patch} -> token grid "
            f"{[p // t for p, t in zip(patch, token)]}; encoder/decoder channels {list(c.channels)}, codebook "
            f"{c.num_embeddings} x {c.embedding_dim} (soft tokens); prior regularisation lambda1 {self.prior_weight}, "
            f"lambda2 {self.sharpness_weight}; GAN weight {self.gan_weight}, gate: disc loss <= {self.gan_threshold} "
            f"(EMA {self.gan_ema_momentum}); discriminator channels {list(self.discriminator_channels)}, lr x"
            f"{self.discriminator_lr_scale}; {self.perceptual_status}")

    def configure_optimizers(self):
        groups: dict[tuple[str, bool], dict] = {}
        for name, p in self.net.named_parameters():
            player = "discriminator" if name.startswith("mim_discriminator.") else "tokenizer"
            no_decay = p.ndim <= 1 or "embedding" in name or any(t in name for t in NO_WEIGHT_DECAY_NAMES)
            key = (player, no_decay)
            if key not in groups:
                groups[key] = {"params": [], "player": player, "weight_decay": 0.0 if no_decay else self.weight_decay,
                               "lr_scale": self.discriminator_lr_scale if player == "discriminator" else 1.0}
            groups[key]["params"].append(p)
        ordered = [groups[k] for k in sorted(groups, key=lambda k: (k[0] != "tokenizer", k[1]))]
        optimizer = make_adamw(ordered, self.initial_lr)
        return optimizer, self.warmup_cosine_schedule(optimizer, self.pretraining_warmup_steps())

    # ---- losses ----------------------------------------------------------------------------------
    def _gan_gate(self, disc_loss: torch.Tensor, training: bool) -> bool:
        value = disc_loss.detach().float()
        if dist.is_available() and dist.is_initialized():  # every rank takes the same decision
            value = value.clone()
            dist.all_reduce(value)
            value /= dist.get_world_size()
        ema = float(self.net.mim_gan_ema)
        new_ema, is_open = update_gan_gate(ema, float(value), self.gan_ema_momentum, self.gan_threshold)
        if training:
            self.net.mim_gan_ema.fill_(new_ema)
        return is_open

    def compute_losses(self, data: torch.Tensor, training: bool) -> dict[str, torch.Tensor]:
        out, logits_real, logits_fake, logits_fake_for_g = self.network(data)
        rec = out.reconstruction.float()
        x = data.float()
        losses = {"l1": F.l1_loss(rec, x)}
        if self.perceptual is not None:
            with record_function("tokenizer.perceptual"):
                a, b = sample_slices(x, rec, self.max_perceptual_slices) if training else sample_slices(x, rec, 10 ** 6)
                losses["perceptual"] = self.perceptual(a, b)
        prior = prior_regularization(out.probs, self.prior_weight, self.sharpness_weight)
        losses["prior_kl"], losses["token_entropy"] = prior["prior_kl"], prior["token_entropy"]
        disc = hinge_discriminator_loss(logits_real.float(), logits_fake.float())
        gan_g = generator_adversarial_loss(logits_fake_for_g.float())
        gate = self._gan_gate(disc, training)
        losses.update(gan_g=gan_g, disc=disc, gan_on=torch.tensor(float(gate), device=data.device))
        reconstruction = losses["l1"] + self.perceptual_weight * losses.get("perceptual", 0.0)
        generator = reconstruction + prior["loss"] + (self.gan_weight * gan_g if gate else 0.0 * gan_g)
        losses["objective"] = generator + disc
        losses["loss"] = reconstruction
        if not training:
            self._accumulate_usage(out.probs)
            if self._preview_batch is None:
                self._preview_batch = (data[:1].detach(), out.reconstruction[:1].detach(),
                                       out.probs[:1].argmax(-1).detach(), out.grid)
        return losses

    def clip_gradients(self) -> torch.Tensor:
        """The tokenizer and the discriminator are clipped separately (one backward trains both players); returns the
        norm over both (non-finite if either is)."""
        norms = [torch.nn.utils.clip_grad_norm_(player.parameters(), self.grad_clip_norm)
                 for player in (self.net.tokenizer, self.net.mim_discriminator)]
        return torch.stack(norms).norm()

    # ---- codebook utilisation, previews ----------------------------------------------------------------
    def _accumulate_usage(self, probs: torch.Tensor) -> None:
        k = probs.shape[-1]
        flat = probs.detach().float().reshape(-1, k)
        counts = torch.bincount(flat.argmax(-1), minlength=k).double()
        if self._usage is None:
            self._usage = [torch.zeros(k, dtype=torch.float64, device=flat.device),
                           torch.zeros(k, dtype=torch.float64, device=flat.device), 0]
        self._usage[0] += counts
        self._usage[1] += flat.sum(0).double()
        self._usage[2] += flat.shape[0]

    def on_validation_epoch_start(self):
        self._preview_batch = None
        self._usage = None
        super().on_validation_epoch_start()

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        super().on_validation_epoch_end(val_outputs)
        if self._usage is None:
            return
        counts, prob_sum, n = self._usage
        if dist.is_available() and dist.is_initialized():
            stats = torch.cat([counts, prob_sum, torch.tensor([float(n)], dtype=torch.float64, device=counts.device)])
            dist.all_reduce(stats)
            k = counts.numel()
            counts, prob_sum, n = stats[:k], stats[k:2 * k], int(stats[-1].item())
        mean_p = (prob_sum / max(n, 1)).cpu().numpy()
        counts = counts.cpu().numpy()
        perplexity = float(np.exp(-(mean_p * np.log(np.clip(mean_p, 1e-12, None))).sum()))
        entropy_val = self.logger.get_value("val_token_entropy", step=-1)
        self.codebook_stats = {"codes_used": int((counts > 0).sum()), "perplexity": perplexity,
                               "mean_token_entropy": float(entropy_val), "tokens": n}
        k = len(counts)
        self.print_to_log_file(
            f"codebook (validation, {n} tokens): {int((counts > 0).sum())}/{k} codes used as argmax, perplexity of "
            f"E[p] {perplexity:.1f} (uniform {k}), mean token entropy {entropy_val:.3f} nats (log K = {math.log(k):.3f})")
        epoch = self.current_epoch
        if self.local_rank == 0 and (epoch % self.preview_every == 0 or epoch == self.num_epochs - 1):
            save_codebook_usage(join(self.output_folder, "codebook_usage.png"), counts, mean_p,
                                f"codebook utilisation on validation tokens, epoch {epoch}: "
                                f"{int((counts > 0).sum())}/{k} codes used,\nperplexity of E[p] {perplexity:.1f}, "
                                f"mean token entropy {entropy_val:.3f} nats (log K = {math.log(k):.2f})")

    def save_preview(self, path: str) -> None:
        image, rec, argmax, grid = self._preview_batch
        img = image[0, 0].float().cpu().numpy()
        r = rec[0, 0].float().cpu().numpy()
        tokens = tokens_to_voxels(argmax[0], grid, sac_token_size(self.net.da))
        save_volume_panels(path, [("input", img, "gray"), ("reconstruction", r, "gray"),
                                  ("|error|", np.abs(r - img), "magma"), ("argmax token", tokens, "tab20")],
                           f"visual tokenizer, epoch {self.current_epoch - 1}")


class VisualTokenizerTrainer_small(VisualTokenizerTrainer):
    """A 16x smaller tokenizer (channels 32/64/128, codebook 256 x 128, discriminator 32/64/128) for CPU trials."""

    channels = (32, 64, 128)
    num_embeddings = 256
    embedding_dim = 128
    discriminator_channels = (32, 64, 128)


# ================================================================================================================
# stage 2: masked visual-token prediction
# ================================================================================================================
def find_tokenizer_checkpoint(dataset_name: str, plans_name: str, configuration: str,
                              trainer: str = TOKENIZER_TRAINER) -> str:
    """Stage-1 checkpoint by convention (same dataset / plans / configuration, fold ``all``), or ``$nnUNet_mim_tokenizer``
    (a checkpoint file or a fold folder; ``random`` = untrained tokenizer, for benchmarks only)."""
    override = settings.read(TOKENIZER_ENV)
    command = (f"nnUNetv2_train {dataset_name} {configuration} all -tr {trainer}"
               + ("" if plans_name == "nnUNetPlans" else f" -p {plans_name}"))
    if override:
        if override == "random":
            return override
        path = join(override, "checkpoint_final.pth") if os.path.isdir(override) else override
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{TOKENIZER_ENV}={override}: no tokenizer checkpoint at {path}.")
        return path
    fold = join(str(nnUNet_results), dataset_name, f"{trainer}__{plans_name}__{configuration}", "fold_all")
    final = join(fold, "checkpoint_final.pth")
    if os.path.isfile(final):
        return final
    hint = ""
    if os.path.isfile(join(fold, "checkpoint_latest.pth")):
        hint = (f" Stage 1 has not finished (only checkpoint_latest.pth): finish it with `{command} --c`, or use the "
                f"intermediate tokenizer explicitly: {TOKENIZER_ENV}={join(fold, 'checkpoint_latest.pth')}.")
    raise FileNotFoundError(
        f"Token MIM (stage 2) needs the stage-1 visual tokenizer of the same dataset, plans and configuration, "
        f"expected at {final}.{hint} Train it first:\n    {command}\nor point {TOKENIZER_ENV} at a tokenizer "
        f"checkpoint (file or fold folder).")


def load_tokenizer(path: str, da: int, num_input_channels: int) -> tuple[VisualTokenizer, str]:
    """Rebuild a frozen tokenizer (eval mode, no gradients) from a stage-1 checkpoint; returns it and a description."""
    if path == "random":
        tok = VisualTokenizer(TokenizerConfig(num_input_channels), da)
        desc = (f"UNTRAINED tokenizer ({TOKENIZER_ENV}=random): only for benchmarking the step cost, the targets are "
                f"meaningless")
    else:
        checkpoint = load_checkpoint(path)
        state = state_dict_of(checkpoint)
        if not any(k.startswith("tokenizer.") for k in state):
            raise ValueError(f"{path} holds no 'tokenizer.*' weights: it is not a {TOKENIZER_TRAINER} checkpoint.")
        stored = (checkpoint.get("init_args") or {}).get(TOKENIZER_CONFIG_KEY)
        # checkpoints of earlier versions carry no configuration: read it back from the weight shapes
        config = TokenizerConfig.from_dict(stored) if stored else tokenizer_config_from_state(state)
        tok = VisualTokenizer(config, da)
        tok.load_state_dict({k[len("tokenizer."):]: v for k, v in state.items() if k.startswith("tokenizer.")})
        desc = f"tokenizer {path}: channels {list(config.channels)}, codebook {config.num_embeddings} x " \
               f"{config.embedding_dim}"
    if tok.config.in_channels != num_input_channels:
        raise ValueError(f"The tokenizer was trained on {tok.config.in_channels} input channel(s), this dataset has "
                         f"{num_input_channels}; train the tokenizer on images with the same channels.")
    return tok.eval().requires_grad_(False), desc


class TokenMIMNet(SACViTPretrainNet):
    """SAC-ViT + learnable mask token + MLP head (one hidden layer, GELU) -> codebook logits (PUMIT "MIM").

    ``mim_mask_token`` is the mask token token MIM uses (the segmentation encoder has none); EVA-02 initialisation
    loads EVA-02's MIM mask token into it. ``mask_token_pos_embed`` sets the encoder's
    :attr:`~nnunet_mim.architectures.sac_vit.SACViT.mask_token_pos_embed`: ``True`` adds the absolute position embedding
    to the mask token (BEiT order), ``False`` gives it RoPE only (official PUMIT code).
    """

    def __init__(self, seg: SACViTSeg, num_embeddings: int, mask_token_pos_embed: bool = True):
        super().__init__(seg)
        self.encoder.mask_token_pos_embed = bool(mask_token_pos_embed)
        c = self.embed_dim
        self.mim_mask_token = nn.Parameter(torch.zeros(1, 1, c))
        trunc_normal_(self.mim_mask_token, std=0.02)
        self.mim_head = nn.Sequential(nn.Linear(c, c), nn.GELU(), nn.Linear(c, num_embeddings))
        for m in self.mim_head:
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, M, K]`` at the masked positions (every sample masks the same number M of tokens)."""
        tokens = self.patch_tokens(self.encoder.forward_features(x, token_mask=token_mask,
                                                                 mask_token=self.mim_mask_token, da=self.da))
        masked = tokens[token_mask].view(x.shape[0], -1, tokens.shape[-1])
        return self.mim_head(masked)


class TokenMIMPretrainer(SACViTPretrainerBase):
    """Stage 2 (PUMIT "MIM Pre-training", eq. 6): mask 55 % of the SAC-ViT tokens uniformly (learnable mask token,
    all blocks see it), predict the frozen tokenizer's soft token at every masked position with an MLP head, loss =
    cross-entropy against the soft targets. Logged: ``token_ce`` and ``token_kl`` = KL(target || prediction).

    ``mask_token_pos_embed``: the mask token gets the absolute position embedding (``True``, BEiT order) or RoPE only
    (``False``, official PUMIT code; ``TokenMIMPretrainer_maskTokenRoPEOnly``). With ``$nnUNet_mim_eva02_weights`` set,
    EVA-02's MIM mask token initialises ``mim_mask_token`` as well as the encoder."""

    mask_ratio: float = 0.55
    mask_token_pos_embed: bool = True
    tokenizer_trainer: str = TOKENIZER_TRAINER
    grad_clip_norm: float = 0.5  # official MIM
    loss_components = ("token_ce", "token_kl")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-4
        self.tokenizer = None
        self.tokenizer_description = ""

    def initialize(self):
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

        path = find_tokenizer_checkpoint(self.plans_manager.dataset_name, self.plans_manager.plans_name,
                                         self.configuration_name, self.tokenizer_trainer)
        da = degree_of_anisotropy(self.configuration_manager.spacing)
        channels = determine_num_input_channels(self.plans_manager, self.configuration_manager, self.dataset_json)
        self.tokenizer, self.tokenizer_description = load_tokenizer(path, da, channels)
        self.tokenizer.to(self.device)
        super().initialize()  # builds the network; EVA-02 weights (if set) go into the encoder
        self._maybe_load_eva02_mask_token()
        check_token_grids(self.tokenizer, self.mim_model, self.configuration_manager.patch_size)
        model = self.mim_model
        self.print_to_log_file(
            f"Token MIM: {self.tokenizer_description}; SAC-ViT embed {model.embed_dim}, depth "
            f"{len(model.encoder.blocks)}, DA {model.da}, token grid {model.token_grid()} (= the tokenizer's), mask "
            f"ratio {self.mask_ratio} ({int(self.mask_ratio * math.prod(model.token_grid()))} of "
            f"{math.prod(model.token_grid())} tokens), mask token "
            f"{'+ absolute position embedding + RoPE' if model.encoder.mask_token_pos_embed else 'with RoPE only'}, "
            f"head -> {self.tokenizer.num_embeddings} codes")

    def _maybe_load_eva02_mask_token(self) -> None:
        """EVA-02's MIM mask token -> ``mim_mask_token`` (the encoder load above has no mask token to put it in)."""
        path = settings.read(EVA02_WEIGHTS_ENV)
        if not path:
            return
        if load_eva02_mask_token(self.mim_model, path):
            self.print_to_log_file(f"mim_mask_token initialised from the EVA-02 mask_token in {path} (the "
                                   f"'mask_token' listed as unused above)")
        else:
            self.print_to_log_file(f"{path} holds no mask_token (e.g. timm's EVA-02 weights drop it): mim_mask_token "
                                   f"keeps its random initialisation")

    @network_builder
    def build_network_architecture(owner, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> TokenMIMNet:
        """The head predicts the loaded tokenizer's codebook when a trainer builds it (training, after
        ``initialize()`` has loaded the tokenizer); built on the class (nnU-Net's predictor, check-weights), it gets
        the default codebook size of :class:`VisualTokenizerTrainer`. Only the ``mim_*`` head depends on it: the
        SAC-ViT keys, which ``-pretrained_weights`` transfers, are the same either way."""
        if isinstance(owner, type):
            num_embeddings = VisualTokenizerTrainer.num_embeddings
        elif owner.tokenizer is None:
            raise RuntimeError("TokenMIMPretrainer builds its network after loading the tokenizer (initialize())")
        else:
            num_embeddings = owner.tokenizer.num_embeddings
        seg = build_sac_vit_seg(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                trainer_name(owner))
        return TokenMIMNet(seg, num_embeddings, owner.mask_token_pos_embed)

    def compute_losses(self, data: torch.Tensor, training: bool) -> dict[str, torch.Tensor]:
        model = self.mim_model
        if training:
            with self.timed("tokenizer"), record_function("mim.tokenizer"), torch.no_grad():
                targets = self.tokenizer.tokenize(data)
        else:
            with torch.no_grad():
                targets = self.tokenizer.tokenize(data)
        b, n, k = targets.shape
        mask = random_token_mask(b, n, self.mask_ratio, device=data.device)
        with record_function("mim.vit"):
            logits = self.network(data, mask).float()
        q = targets[mask].view(b, -1, k)
        ce = soft_cross_entropy(logits, q)  # eq. 6 on the masked positions
        losses = {"token_ce": ce, "token_kl": ce - entropy(q).mean(), "loss": ce}
        if not training and self._preview_batch is None:
            self._preview_batch = (data[:1].detach(), mask[:1].detach(), targets[:1].argmax(-1).detach(),
                                   logits[:1].argmax(-1).detach(), model.token_grid())
        return losses

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        tok, step = self.mean_step_time("tokenizer"), self.mean_step_time("step")
        if math.isfinite(tok) and math.isfinite(step):
            self.print_to_log_file(f"tokenizer (eval, no grad): {tok:.3f} s of a {step:.3f} s training step "
                                   f"({100 * tok / step:.1f} %)")

    def save_preview(self, path: str) -> None:
        image, mask, target, predicted, grid = self._preview_batch
        token = self.mim_model.token_size
        img = image[0, 0].float().cpu().numpy()
        m = mask[0].float()
        pred_full = target[0].clone().float()
        pred_full[mask[0]] = predicted[0].float()
        vox_mask = tokens_to_voxels(m, grid, token) > 0.5
        masked_img = np.where(vox_mask, np.nan, img)
        tgt = tokens_to_voxels(target[0].float(), grid, token)
        pred = np.where(vox_mask, tokens_to_voxels(pred_full, grid, token), np.nan)
        save_volume_panels(path, [("input", img, "gray"), ("masked input", masked_img, "gray"),
                                  ("tokenizer argmax", tgt, "tab20"), ("predicted argmax (masked)", pred, "tab20")],
                           f"token MIM, epoch {self.current_epoch - 1}")


def check_token_grids(tokenizer: VisualTokenizer, model: SACViTPretrainNet, patch_size) -> None:
    """The MIM mask lives on the SAC-ViT token grid and the targets on the tokenizer's: they must be the same."""
    vit_grid = tuple(model.token_grid(patch_size))
    tok_grid = tuple(tokenizer.token_grid(patch_size, model.da))
    if vit_grid != tok_grid or tokenizer.da != model.da:
        raise ValueError(
            f"Tokenizer / SAC-ViT token grids differ for patch {list(patch_size)}: tokenizer {tok_grid} (DA "
            f"{tokenizer.da}, token {sac_token_size(tokenizer.da)}), SAC-ViT {vit_grid} (DA {model.da}, token "
            f"{model.token_size}). Both must tokenise the patch identically (16 in-plane, 16 >> DA in depth, the same "
            f"DA from the plan spacing); use a patch divisible by the token size (`nnunet_mim add-config sac-vit`).")


class TokenMIMPretrainer_mask40(TokenMIMPretrainer):
    """Mask-ratio variant (BEiT's 40 %)."""

    mask_ratio = 0.4


class TokenMIMPretrainer_mask75(TokenMIMPretrainer):
    mask_ratio = 0.75


class TokenMIMPretrainer_maskTokenRoPEOnly(TokenMIMPretrainer):
    """The official PUMIT code's mask token: the absolute position embedding is added to the visible tokens only; a
    masked position's input is the bare mask token, located by RoPE inside attention."""

    mask_token_pos_embed = False
