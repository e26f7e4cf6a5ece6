"""Built-in tasks, one module each; every module here is imported by the task registry."""
