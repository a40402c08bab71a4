"""core: the ground floor every package stands on, importing none of them.

- `config`   typed, strict dataclass configs from YAML + `section.key=value` overrides; the error types
- `cli`      `--config` / overrides / `config` subcommand / one-line errors of every `python -m` entry point
- `fsutil`   atomic writes (temp name, then rename): nothing half-written is ever read
- `vocab`    the shared label vocabularies: planes, structures, phenotypes, diseases, modalities, views
- `format`   the on-disk sample format (WebDataset members, Zarr rows) and `StoreReader`
- `manifest` `Manifest`, the contract between a conversion and its readers, loaded and checked once
- `net`      a free port for a rendezvous
- `registry` components registered by name (pretraining stages, fine-tuning tasks)

Light imports only (stdlib, numpy, pyyaml, numcodecs, zarr on use): the GPU machines import it without ray.
"""
