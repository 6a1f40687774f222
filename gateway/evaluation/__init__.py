"""Off-policy evaluation: what would another configuration have scored, and cost, on the traffic
the gateway already served? (`llm-router evaluate`, `POST /v1/evaluate`.)

Every routed call records every eligible arm's propensity and the context it was decided from
(`gateway.calls.decision_dict`). A candidate configuration (settings overrides) decides each
logged call again with the real routing code, frozen at the state learned before the window
(`candidate`, `logs`); inverse propensity scoring, its self-normalised form and a doubly robust
estimator with a reward model fitted on the logs turn the two policies' propensities and the
observed outcomes into estimates with intervals (`estimators`, `reward`); `run` ties it
together, `report` renders it, `service` is the gateway's part behind the admin endpoint.
"""
