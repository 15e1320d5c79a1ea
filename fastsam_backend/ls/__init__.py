"""Label Studio's side: the wire protocol, prompts, label configs, annotations, regions, its REST API."""
