from twisted.application.service import ServiceMaker

ksproxy = ServiceMaker(
    "ksproxy",
    "ksproxy.tap",
    "API gateway for KubeSphere-style extensions (APIService, JSBundle, ReverseProxy).",
    "ksproxy",
)
