// Validates custom resources against the schemas of @kubernetes-models: reads a JSON array of
// objects on stdin, prints one line per object, exits 1 if any fails or has an unknown kind.
import { PodMonitor, PrometheusRule, ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import { AlertmanagerConfig } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1alpha1";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1";

const MODELS = {
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1/PodMonitor": PodMonitor,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
  "monitoring.coreos.com/v1alpha1/AlertmanagerConfig": AlertmanagerConfig,
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
let failed = false;
for (const object of JSON.parse(input)) {
  const key = `${object.apiVersion}/${object.kind}`;
  const Model = MODELS[key];
  try {
    if (!Model) throw new Error(`no schema for ${key}`);
    new Model(object).validate();
    console.log(`ok ${key} ${object.metadata.name}`);
  } catch (error) {
    failed = true;
    console.log(`FAIL ${key} ${object.metadata?.name}: ${error.message}`);
  }
}
process.exit(failed ? 1 : 0);
