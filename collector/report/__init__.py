"""What the collector tells people: outcomes from sessions fanned out to Prometheus
metrics and to direct notifications (webhook, e-mail).
"""
