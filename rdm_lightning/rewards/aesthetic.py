"""The LAION aesthetic predictor: a linear MLP on CLIP ViT-L/14 image embeddings, scores about 1–10.

:class:`AestheticReward` is christophschuhmann/improved-aesthetic-predictor's
``sac+logos+ava1-l14-linearMSE.pth`` on top of ``openai/clip-vit-large-patch14``'s
L2-normalised image embedding, both loaded offline from local files, with the tensor-only
CLIP preprocessing of :mod:`rdm_lightning.rewards.clip` (differentiable). The score depends on
the image only (docs/rewards.md). transformers is imported when the model is loaded.
"""
from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from rdm_lightning.rewards.base import RewardModel
from rdm_lightning.rewards.clip import clip_image_embeddings, clip_preprocess, require_clip_folder

AESTHETIC_MLP_FILE = (
    "sac+logos+ava1-l14-linearMSE.pth, the state dict of the improved aesthetic predictor's MLP "
    "(torch.save'd, keys layers.{0,2,4,6,7}.{weight,bias}, layers.0.weight of shape (1024, 768)), "
    "published at https://github.com/christophschuhmann/improved-aesthetic-predictor"
)
AESTHETIC_CLIP_FOLDER = (
    "a snapshot of the hub repo openai/clip-vit-large-patch14 (config.json and model.safetensors or "
    "pytorch_model.bin, as CLIPModel.save_pretrained writes them); no tokenizer is needed"
)


class AestheticMLP(nn.Module):
    """The improved aesthetic predictor's head: five linear layers without activations.

    ``Linear(D, 1024) Dropout(0.2) Linear(1024, 128) Dropout(0.2) Linear(128, 64) Dropout(0.1)
    Linear(64, 16) Linear(16, 1)`` as ``layers``, so that its state dict keys are the published
    file's (``layers.0``, ``.2``, ``.4``, ``.6``, ``.7``). The dropouts only keep those indices:
    rewards run in eval mode, where they are the identity.

    Args:
        embedding_dim: Width ``D`` of the image embeddings (768 for CLIP ViT-L/14).
    """

    def __init__(self, embedding_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embedding_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        """Scores ``(B,)`` of embeddings ``(B, D)``."""
        return self.layers(embeddings).squeeze(-1)


def require_aesthetic_mlp_file(path: Path) -> None:
    """Raise a FileNotFoundError naming :data:`AESTHETIC_MLP_FILE` unless ``path`` is a file."""
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic MLP weights not found at {str(path)!r}; expected {AESTHETIC_MLP_FILE}")


def load_aesthetic_mlp(path: Path, embedding_dim: int) -> AestheticMLP:
    """An :class:`AestheticMLP` for ``embedding_dim``-wide embeddings with the weights of ``path``
    (:data:`AESTHETIC_MLP_FILE`), in float32.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: ``path`` is not a torch-saved state dict, has other keys (the message names
            the missing and the unexpected ones), takes embeddings of another width than
            ``embedding_dim``, or has a tensor of another shape.
    """
    require_aesthetic_mlp_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(
            f"torch.load cannot read {str(path)!r} as a state dict ({error}); expected {AESTHETIC_MLP_FILE}"
        ) from error
    if not (isinstance(state, Mapping) and all(isinstance(value, Tensor) for value in state.values())):
        raise ValueError(
            f"{str(path)!r} holds a {type(state).__name__}, not a state dict of tensors; expected {AESTHETIC_MLP_FILE}"
        )
    mlp = AestheticMLP(embedding_dim)
    expected = mlp.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"aesthetic MLP weights {str(path)!r} lack keys {missing} and have unexpected keys {unexpected}; "
            f"expected {AESTHETIC_MLP_FILE}"
        )
    first_shape = tuple(state["layers.0.weight"].shape)
    if len(first_shape) != 2 or first_shape[1] != embedding_dim:
        raise ValueError(
            f"aesthetic MLP {str(path)!r} takes embeddings of width {first_shape[1:]} (layers.0.weight "
            f"{first_shape}), but the CLIP model's image embeddings have width {embedding_dim}; the published "
            f"MLP is for CLIP ViT-L/14 (openai/clip-vit-large-patch14, width 768)"
        )
    wrong = [
        f"{key} {tuple(state[key].shape)} (expected {tuple(tensor.shape)})"
        for key, tensor in expected.items()
        if state[key].shape != tensor.shape
    ]
    if wrong:
        raise ValueError(f"aesthetic MLP weights {str(path)!r} have tensors of wrong shapes: {', '.join(wrong)}")
    mlp.load_state_dict(state)
    return mlp


class AestheticReward(RewardModel):
    """LAION aesthetic score of the image alone, about 1–10; differentiable.

    ``MLP(normalize(f_img))``: the improved aesthetic predictor's :class:`AestheticMLP` on the
    L2-normalised projected image embedding of CLIP ViT-L/14. Images are preprocessed as the
    reference's OpenAI CLIP preprocess does: shorter side to the model size (224) bicubically with
    antialiasing (PIL's filter), centre crop, OpenAI normalisation (docs/rewards.md).

    The prompts are accepted, as by every reward, but ignored: the reference predictor scores
    images only. Only the CLIP vision tower and visual projection are kept after loading.

    Args:
        clip_model_path: Local snapshot folder of ``openai/clip-vit-large-patch14``
            (``CLIPModel.save_pretrained`` layout; no tokenizer needed).
        mlp_path: Local path of ``sac+logos+ava1-l14-linearMSE.pth``.
        name: Name in logs; ``None`` uses the class name.
        train_scale: Factor of the score in training objectives.
        report_scale: Factor of the score in reported tables.

    Raises:
        FileNotFoundError: ``clip_model_path`` lacks a model config or weights, or ``mlp_path``
            is not a file.
        ValueError: ``clip_model_path`` is not a CLIPModel, or the MLP file is not the
            predictor's state dict or does not fit the CLIP embedding width
            (see :func:`load_aesthetic_mlp`).
    """

    differentiable = True

    def __init__(
        self,
        clip_model_path: str,
        mlp_path: str,
        name: str | None = None,
        train_scale: float = 1.0,
        report_scale: float = 1.0,
    ) -> None:
        super().__init__(name=name, train_scale=train_scale, report_scale=report_scale)
        folder = Path(clip_model_path).expanduser()
        require_clip_folder(folder, AESTHETIC_CLIP_FOLDER, tokenizer=False)
        mlp_file = Path(mlp_path).expanduser()
        # Checked before the CLIP load, which takes seconds at ViT-L size.
        require_aesthetic_mlp_file(mlp_file)
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type != "clip":
            raise ValueError(
                f"{str(folder / 'config.json')!r} has model_type {model_type!r}, not 'clip'; "
                f"expected {AESTHETIC_CLIP_FOLDER}"
            )
        # Imported here so that importing the rewards package does not load transformers' CLIP.
        from transformers import CLIPModel

        # float32 explicitly: transformers 5 otherwise keeps the checkpoint's dtype.
        clip = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection
        self.image_size = clip.config.vision_config.image_size
        self.mlp = load_aesthetic_mlp(mlp_file, self.visual_projection.out_features)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        # Image-only, as the reference predictor: the prompts do not enter the score.
        pixels = clip_preprocess(images, self.image_size, mode="bicubic", antialias=True)
        return self.mlp(clip_image_embeddings(self.vision_model, self.visual_projection, pixels))
