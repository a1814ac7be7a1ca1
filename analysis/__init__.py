"""Command-line analysis tools for trained CoIC encoders and models.

Each tool is a module with ``main(argv) -> exit code`` and runs as ``python -m analysis.<tool>``
from the repository's root:

- ``representation_map``: z of N images per dataset -> TensorBoard projector + 2-D scatter;
- ``dataset_relationships``: mean cosine similarity of z between/within datasets (heat-map, CSV);
- ``rain_detail``: how far z moves when rain or detail is removed, and its correlation with
  the PSNR gain of CoIC over the model without it;
- ``model_cost``: parameters, MACs and latency per backbone, with and without modulation;
- ``contrastive_temperature`` (old name ``temperature_sweep``): contrastive accuracy and PSNR of
  checkpoints trained at different temperatures of the contrastive loss;
- ``modulation_temperature``: the temperature of the CoI-M kernel softmax, per modulated layer and
  dataset (how strongly each layer is modulated).

The math lives in small pure functions (``relationship_matrix``, ``z_shift``, ``pearson``,
``pca_2d``, ``contrastive_stats``, ``count_parameters``, ``count_macs``) that the tests check on
hand-made inputs. Nothing is imported eagerly here, so ``import analysis`` stays cheap.
"""
