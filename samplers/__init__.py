"""Built-in negative samplers, one module each; every module here is imported by the sampler
registry, so adding a sampler is adding one file."""
