"""The model runtime both sides run: the TFLite interpreter, the crash-isolated model check, the
language-model engine with its tokenizer, and the smoke-vector runner. The device agent serves
models with it; the fleet's release builder computes and checks smoke vectors with it, so a
release is judged the same way where it is built and where it is installed."""
