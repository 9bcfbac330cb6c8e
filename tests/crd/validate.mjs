// Reads a JSON array of Kubernetes objects on stdin; validates every KEDA / Prometheus Operator / cert-manager object
// against its CRD's schema (the models of kubernetes-models-ts). Prints one line per object; exit 1 if any
// is invalid or of a custom kind this script does not know.
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { Certificate } from "@kubernetes-models/cert-manager/cert-manager.io/v1/Certificate";
import { Issuer } from "@kubernetes-models/cert-manager/cert-manager.io/v1/Issuer";
import { ClusterIssuer } from "@kubernetes-models/cert-manager/cert-manager.io/v1/ClusterIssuer";

const MODELS = [ScaledObject, TriggerAuthentication, ServiceMonitor, PodMonitor, Certificate, Issuer, ClusterIssuer];
const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
let failed = 0;
for (const object of JSON.parse(Buffer.concat(chunks).toString())) {
  const name = `${object.kind}/${object.metadata?.name}`;
  const group = object.apiVersion.includes("/") ? object.apiVersion.split("/")[0] : "";
  if (!group.includes(".") || group.endsWith(".k8s.io")) continue;  // built-in kinds: kubernetes-validate's job
  const model = MODELS.find((m) => m.apiVersion === object.apiVersion && m.kind === object.kind);
  if (!model) { console.log(`UNKNOWN ${name} (${object.apiVersion})`); failed++; continue; }
  try { new model(object).validate(); console.log(`OK ${name}`); }
  catch (error) { console.log(`INVALID ${name}: ${error.message}`); failed++; }
}
process.exit(failed ? 1 : 0);
