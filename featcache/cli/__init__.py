"""The ``featcache`` command line: parse options, call one library function, print the result.

One module per family of commands (``extraction``, ``runs``, ``reports``, ``listing``, ``retrieval``); ``common``
holds what they share. Importing this package imports neither torch nor torchvision: each command
imports the library it calls.
"""

from __future__ import annotations

import logging

import click

from . import extraction, listing, reports, retrieval, runs
from .common import Group, LibraryError, echo_json, fail_cleanly, flag_names
from .extraction import extract_config, extraction_options

__all__ = ["main", "LibraryError", "echo_json", "extract_config", "extraction_options", "fail_cleanly", "flag_names"]


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="featcache")
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does (warnings always show).")
def main(verbose: bool) -> None:
    """Run a frozen pretrained backbone once, cache its features in HDF5, fit heads in seconds."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from ..common.runtime import tune_allocator

    tune_allocator()  # freed activation buffers are reused instead of page-faulted in again


for _module in (extraction, listing, runs, reports, retrieval):
    for _command in vars(_module).values():
        if isinstance(_command, click.Command):
            main.add_command(_command)
