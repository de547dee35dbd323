"""`python -m hellora_pl fit|validate|test --config FILE`: LightningCLI over HelloraModule."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from .module import HelloraModule


class HelloraCLI(LightningCLI):
    """LightningCLI whose model is a HelloraModule; data modules and callbacks come from the config."""


def main(args=None) -> None:
    HelloraCLI(
        HelloraModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": False},
        parser_kwargs={"allow_abbrev": False},  # a typo in a flag is an error, not a prefix match
        args=args,
    )


if __name__ == "__main__":
    main()
