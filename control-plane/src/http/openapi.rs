//! Completes the OpenAPI document the handlers' annotations produce with what every
//! operation shares, so that the document names every status the API can answer and its
//! media type: errors are `application/problem+json`; every operation may answer 401,
//! 403 and 429; one with a body 400, 413, 415 and 422; one with query parameters 400 and
//! 422; one with
//! a path parameter 404; a mutating one 409 (idempotency) and 503 (catching up), and it
//! takes an `Idempotency-Key` header. Written once here instead of on every handler.

use serde_json::{Map, Value, json};

/// Operations authorised by the operator token rather than an API key.
const OPERATOR_PATHS: [&str; 1] = ["/v1/operator/tenants"];

/// Adds the shared responses, parameters and media types to every operation, and links
/// from each creation to the operations on what it created.
pub fn complete(document: &mut Value) {
    unique_operation_ids(document);
    link_creations(document);
    let Some(paths) = document.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, operation) in item.iter_mut() {
            if !matches!(method.as_str(), "get" | "post" | "put" | "patch" | "delete") {
                continue;
            }
            complete_operation(path, method, operation);
        }
    }
}

/// Handlers in different areas share names (`get`, `create`, `list`): an operation id
/// used more than once is prefixed with its tag, so every id is unique as OpenAPI asks
/// (links name operations by id).
fn unique_operation_ids(document: &mut Value) {
    let Some(paths) = document.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for item in paths.values() {
        for operation in item.as_object().into_iter().flat_map(|item| item.values()) {
            if let Some(id) = operation.get("operationId").and_then(Value::as_str) {
                *counts.entry(id.to_owned()).or_insert(0) += 1;
            }
        }
    }
    for item in paths.values_mut() {
        for operation in item
            .as_object_mut()
            .into_iter()
            .flat_map(|item| item.values_mut())
        {
            let Some(id) = operation.get("operationId").and_then(Value::as_str) else {
                continue;
            };
            if counts.get(id).copied().unwrap_or(0) < 2 {
                continue;
            }
            let tag = operation
                .pointer("/tags/0")
                .and_then(Value::as_str)
                .unwrap_or("api")
                .replace(' ', "_");
            let unique = format!("{tag}_{id}");
            operation["operationId"] = json!(unique);
        }
    }
}

/// For every `POST /v1/things` that answers 201, OpenAPI links to the operations on
/// `/v1/things/{id}…` with the created object's `id`: a client (or a fuzzer) can follow
/// a creation to its object.
fn link_creations(document: &mut Value) {
    let Some(paths) = document.get("paths").and_then(Value::as_object) else {
        return;
    };
    let mut links: Vec<(String, String, Value)> = Vec::new();
    for (collection, item) in paths {
        if item.pointer("/post/responses/201").is_none() {
            continue;
        }
        let prefix = format!("{collection}/{{");
        for (path, target) in paths {
            let Some(rest) = path.strip_prefix(&prefix) else {
                continue;
            };
            let Some((parameter, _)) = rest.split_once('}') else {
                continue;
            };
            // Only paths with one parameter: the created object's id.
            if rest.contains('{') {
                continue;
            }
            let Some(target) = target.as_object() else {
                continue;
            };
            for (method, operation) in target {
                let Some(operation_id) = operation.get("operationId").and_then(Value::as_str)
                else {
                    continue;
                };
                links.push((
                    collection.clone(),
                    format!("{method}_{operation_id}"),
                    json!({
                        "operationId": operation_id,
                        "parameters": {parameter: "$response.body#/id"}
                    }),
                ));
            }
        }
    }
    for (collection, name, link) in links {
        if let Some(response) = document
            .pointer_mut(&format!(
                "/paths/{}/post/responses/201",
                escape(&collection)
            ))
            .and_then(Value::as_object_mut)
        {
            let entry = response.entry("links").or_insert_with(|| json!({}));
            if let Some(entry) = entry.as_object_mut() {
                entry.insert(name, link);
            }
        }
    }
}

/// A JSON pointer segment for `text` (RFC 6901).
fn escape(text: &str) -> String {
    text.replace('~', "~0").replace('/', "~1")
}

fn problem(description: &str) -> Value {
    json!({
        "description": description,
        "content": {
            protocol::PROBLEM_CONTENT_TYPE: {
                "schema": {"$ref": "#/components/schemas/Problem"}
            }
        }
    })
}

fn retry_after(mut response: Value) -> Value {
    response["headers"] = json!({
        "Retry-After": {
            "description": "Seconds to wait before retrying.",
            "schema": {"type": "integer", "minimum": 1}
        }
    });
    response
}

/// Adds the `Idempotency-Key` header to a mutating operation that does not document it.
fn document_idempotency_key(operation: &mut Value, parameters: &[Value]) {
    let documented = parameters.iter().any(|parameter| {
        parameter["in"] == "header"
            && parameter["name"]
                .as_str()
                .is_some_and(|name| name.eq_ignore_ascii_case("idempotency-key"))
    });
    if documented {
        return;
    }
    let list = operation
        .as_object_mut()
        .map(|object| object.entry("parameters").or_insert_with(|| json!([])));
    if let Some(Value::Array(list)) = list {
        list.push(json!({
            "name": "Idempotency-Key",
            "in": "header",
            "required": false,
            "description": "Makes the request exactly-once (1 to 255 printable ASCII characters; SPEC 9).",
            "schema": {"type": "string", "maxLength": 255}
        }));
    }
}

/// Refusals are problem documents (RFC 9457) whatever the handler's annotation said;
/// every success has a description.
fn as_problems(responses: &mut serde_json::Map<String, Value>) {
    for (status, response) in responses.iter_mut() {
        let is_error = status.starts_with('4') || status.starts_with('5');
        if is_error {
            let description = response
                .get("description")
                .and_then(Value::as_str)
                .filter(|text| !text.is_empty())
                .unwrap_or("A problem document naming what was wrong.")
                .to_owned();
            *response = problem(&description);
        } else if response.get("description").is_none()
            && let Some(object) = response.as_object_mut()
        {
            object.insert("description".into(), json!("Success."));
        }
    }
}

/// Who may call: an operator operation answers 401 without the token; the others also
/// 403 for a missing scope and 429 over a rate limit.
fn access_problems(responses: &mut serde_json::Map<String, Value>, operator: bool) {
    let mut add = |status: &str, response: Value| {
        responses.entry(status.to_owned()).or_insert(response);
    };
    if operator {
        add(
            "401",
            problem("The operator token is missing or wrong (or none is configured)."),
        );
    } else {
        add("401", problem("No valid API key (`unauthorized`)."));
        add(
            "403",
            problem("The key lacks the scope this operation needs (`missing_scope`)."),
        );
        add(
            "429",
            retry_after(problem(
                "Over the environment's rate limit, or this client address's budget of failed authentications (`rate_limited`).",
            )),
        );
    }
}

fn complete_operation(path: &str, method: &str, operation: &mut Value) {
    let has_body = operation.get("requestBody").is_some();
    let parameters = operation
        .get("parameters")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let has_query = parameters
        .iter()
        .any(|parameter| parameter["in"] == "query");
    let has_path = path.contains('{');
    let mutating = method != "get";
    let operator = OPERATOR_PATHS.contains(&path);

    if mutating && !operator {
        document_idempotency_key(operation, &parameters);
    }
    let Some(responses) = operation
        .as_object_mut()
        .map(|object| object.entry("responses").or_insert_with(|| json!({})))
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    as_problems(responses);
    access_problems(responses, operator);
    let mut add = |status: &str, response: Value| {
        responses.entry(status.to_owned()).or_insert(response);
    };
    if mutating && !operator {
        add(
            "400",
            problem("The request does not have the documented shape."),
        );
        add(
            "422",
            problem(
                "A value breaks a rule the document cannot state, such as an `Idempotency-Key` that is not 1 to 255 printable ASCII characters; `field` names it.",
            ),
        );
    }
    if has_body || has_query {
        add(
            "400",
            problem(
                "The request does not have the documented shape (not JSON, a missing or unknown field, a wrong type); `field` names it when it can.",
            ),
        );
        add(
            "422",
            problem(
                "The request has the documented shape, but a value breaks a rule the document cannot state; `field` names it.",
            ),
        );
    }
    if has_body {
        add(
            "413",
            problem("The body is larger than `server.body_limit_bytes` (`payload_too_large`)."),
        );
        add(
            "415",
            problem("The body is not JSON (`Content-Type: application/json`)."),
        );
    }
    if has_path || has_body || has_query {
        add(
            "404",
            problem(
                "No such object in this environment, or the request names one that does not exist (`not_found`, `feature_not_found`).",
            ),
        );
    }
    if mutating && !operator {
        add(
            "409",
            problem(
                "The idempotency key is in flight or was used with another request, or the object's state refuses the operation.",
            ),
        );
        add(
            "503",
            retry_after(problem(
                "The end user's due work is being caught up (`catching_up`); retry after `Retry-After`.",
            )),
        );
    }
    sort(responses);
}

/// Keeps responses in status order (the document is read by people too).
fn sort(responses: &mut Map<String, Value>) {
    let mut entries: Vec<(String, Value)> = std::mem::take(responses).into_iter().collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    responses.extend(entries);
}

#[cfg(test)]
mod tests {
    use super::*;

    // A mutating operation with a path parameter and a body gains every shared status,
    // the idempotency header, and problem media types on its own refusals.
    #[test]
    fn shared_responses_are_added() {
        let mut document = json!({"paths": {"/v1/things/{id}": {"post": {
            "requestBody": {"content": {"application/json": {}}},
            "responses": {"200": {}, "402": {"content": {"application/json": {}}}}
        }}}});
        complete(&mut document);
        let operation = &document["paths"]["/v1/things/{id}"]["post"];
        let statuses: Vec<&String> = operation["responses"]
            .as_object()
            .expect("responses")
            .keys()
            .collect();
        assert_eq!(
            statuses,
            vec![
                "200", "400", "401", "402", "403", "404", "409", "413", "415", "422", "429", "503"
            ]
        );
        assert!(
            operation["responses"]["402"]["content"][protocol::PROBLEM_CONTENT_TYPE].is_object()
        );
        assert_eq!(operation["parameters"][0]["name"], "Idempotency-Key");
    }
}
