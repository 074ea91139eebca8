"""The labeling web app (Gradio): pairwise and single-response feedback, admin, dashboard."""
