"""What the project image carries besides the code: the data an installed package cannot find
beside its source tree."""

from __future__ import annotations

from python_on_whales import DockerClient


def test_image_writes_an_emulated_preset_from_its_shipped_profiles(project_image: str) -> None:
    output = DockerClient().run(
        project_image,
        ["sh", "-c", "disagfusion init-model emulated /tmp/m >/dev/null && python -c "
         "\"from pathlib import Path; from disagfusion.cost import CostProfile; "
         "print(CostProfile.load(next(Path('/tmp/m').glob('profile.yaml'))).source)\""],
        remove=True,
        networks=["none"],
    )
    assert output.startswith("synthetic"), output
