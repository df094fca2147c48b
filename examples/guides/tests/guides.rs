//! Every guide runs to the end against a freshly started control plane (and proxy): CI
//! fails when one breaks.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ai_chatbot() {
    guides::ai_chatbot::run()
        .await
        .expect("the AI chatbot guide");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_platform() {
    guides::api_platform::run()
        .await
        .expect("the API platform guide");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_wrapper() {
    guides::llm_wrapper::run()
        .await
        .expect("the LLM wrapper guide");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saas_addon() {
    guides::saas_addon::run()
        .await
        .expect("the SaaS add-on guide");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_tool() {
    guides::dev_tool::run()
        .await
        .expect("the developer tool guide");
}
